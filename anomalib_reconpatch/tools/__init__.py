"""The ``reconpatch`` command: offline weights, demo data, comparison with PatchCore, OpenVINO predict.

Tools import the model and the components; neither ever imports the tools.
"""
