"""The napari layer of napari-ebm: reader, writer, sample data and dock widgets.

Only this subpackage imports napari and Qt, and only it shows notifications.
"""
