"""segflow's own output writers, one module each, registered in
:data:`segflow.store.writers.BUILTIN_WRITERS` (see :mod:`segflow.store.writers` for the
protocol): the region table, the vector table, the OME-Zarr view and its pyramid, the
DICOM SEG, the quick look."""
