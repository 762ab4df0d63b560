"""Files: reading and writing DCE series, masks and maps (DICOM, NIfTI, NRRD, Slicer MultiVolume NRRD).

Modules: ``series`` (``DCESeries``), ``readers`` and ``vfa_dicom`` (the public readers), ``writers``,
``sources`` (what a path holds; checks every reader shares), ``sitk_images`` (through SimpleITK),
``image_files`` (NIfTI / NRRD voxels read directly, NaN kept), ``header_timing`` (NIfTI / NRRD frame
times), ``nrrd_writer``, ``dicom``. The public names below are importable from ``DCEPKFittingLib.io``.

Public API
----------
``read_dce(path, times_s=None, dt_s=None, kind=None)`` -> :class:`DCESeries`
    ``path`` is a folder or list of DICOM files, a multi-frame DICOM file, a 4-D NIfTI
    (``.nii``/``.nii.gz``), a 4-D NRRD (``.nrrd``/``.nhdr``, including Slicer MultiVolume and
    volume-sequence files) or a 4-D MetaImage (``.mha``/``.mhd``, no timing: give it).
``read_volume(path)`` -> ``(array [k, j, i], Geometry)`` (a 4-D file gives ``[k, j, i, n]``).
``read_mask(path, reference_geometry, reference_shape, labels=False)`` -> bool (or int) ``[k, j, i]``.
``write_volume(path, array, geometry, overwrite=False)`` -> Path (NIfTI, NRRD or MetaImage by suffix).
``write_dce_series(path, series, overwrite=False)`` -> Path (Slicer MultiVolume / sequence NRRD).
``write_maps(out_dir, maps, geometry, suffix='.nii.gz', overwrite=False)`` -> list of Paths.
``stage_volume`` / ``stage_dce_series`` / ``stage_maps`` add the same files to an
``output_files.OutputSet``, so that one command publishes all its outputs or none.

Every writer goes through ``output_files``: staged under a unique temporary name, verified (the
header read back against the data size), published atomically. Every reader keeps NaN and inf
(NIfTI data are read here: SimpleITK's NIfTI reader turns them into 0) and refuses a file whose
data are shorter than its header says, naming both sizes.

Timing rules (all times in seconds in the API)
----------------------------------------------
* An explicit ``times_s`` (one per frame) or ``dt_s`` (frame ``n`` at ``n * dt_s``) is for files
  without timing. Where the file has its own, different times, they are refused unless
  ``override_file_timing=True`` (``--override-timing``); giving both is an error.
* Times must look like seconds: a median frame interval over 300 s (or a series over 3 h) or under
  0.05 s is refused as a unit mistake (ms or minutes).
* DICOM: frames are ordered and timed by the first of AcquisitionTime (with AcquisitionDate),
  TriggerTime, ContentTime (with ContentDate) that differs between the images of every slice
  position. Times are relative to the first frame (frame 0 at 0 s), because clock times have
  no meaningful zero. For a 2-D multi-slice acquisition, a frame's time is the mean of its
  slices' times (``metadata['frame_time_spread_s']`` says how far they are apart). A TriggerTime
  missing from the first frame only is taken as 0 ms (as in the QIBA v6 phantom). Slices are
  sorted along the slice normal; a folder mixing series is an error that lists them
  (``series_uid=`` picks one, ``'all'`` joins series that each hold one time point).
* NRRD: the sequence index (``axis N index values`` with a time unit), else
  ``MultiVolume.FrameLabels`` (milliseconds unless ``MultiVolume.FrameIdentifyingDICOMTagUnits``
  says otherwise), kept as stored (not shifted to 0) so files round-trip exactly.
* NIfTI: ``toffset + n * pixdim[4]`` in the unit of ``xyzt_units`` (s, ms or us).
* Otherwise :class:`DCEPKInputError` asks for ``--times``/``--dt`` in seconds.
"""

from .readers import MIN_FRAMES, read_dce, read_mask, read_volume
from .series import TIME_UNITS_TO_S, DCESeries, finite_voxels
from .sources import volume_suffix
from .vfa_dicom import VFASeries, read_vfa_dicom
from .writers import (map_targets, stage_dce_series, stage_maps, stage_volume, write_dce_series, write_maps,
                      write_volume)

__all__ = ["DCESeries", "finite_voxels", "map_targets", "MIN_FRAMES", "read_dce", "read_mask", "read_vfa_dicom",
           "read_volume", "stage_dce_series", "stage_maps", "stage_volume", "TIME_UNITS_TO_S", "VFASeries",
           "volume_suffix", "write_dce_series", "write_maps", "write_volume"]
