"""The MRML bridge: Slicer scene nodes <-> the core's arrays, series, masks and tables (the one part of
DCEPKFittingLib, with ``widgets``, that imports ``slicer``; never ``qt``).

It runs in Slicer and under the headless ``slicer-core`` wheel (tests). Every function takes the nodes
(and the scene where it creates nodes) explicitly, so nothing here relies on ``slicer.mrmlScene`` or
``slicer.app``. Conventions (docs/ARCHITECTURE.md): arrays ``[k, j, i]``, series ``[k, j, i, t]``,
geometry through ``Geometry.from_ijk_to_ras`` / ``ijk_to_ras()``, times in seconds (Slicer's
``MultiVolume.FrameLabels`` are milliseconds and are converted here), TR in seconds, FA in degrees.

Modules: ``volumes`` (node <-> array, geometry), ``sequences`` (volume sequence <-> ``DCESeries``, header,
grid), ``masks`` (ROI, label map, segment -> mask), ``map_volumes`` (output maps and their display),
``tables`` (statistics tables), ``plots``, ``aif_roi`` (the AIF box), ``sample_data`` (the phantom in
the scene), ``scene_fit`` (the module Logic's prepare / compute / publish), ``child_fit`` (where the
compute runs: a worker thread or a ``dcepk`` child process). Their public names are importable from
``DCEPKFittingLib.mrml``.
"""

from .aif_roi import AIF_BOX_VOXELS, place_roi_on_series, roi_around_mask
from .child_fit import child_python, detected_input_function_files, scene_fit_place, start_scene_fit
from .map_volumes import (colour_node, default_colour_for_map, find_output_node, hide_nan_voxels, OUTPUT_MAP_ATTRIBUTE,
                          robust_window, status_colour_table, status_entries, STATUS_TABLE, UNITS_ATTRIBUTE,
                          update_volume_from_array)
from .masks import (mask_from_labelmap, mask_from_node, mask_from_roi, mask_from_segment, mean_curve_in_mask,
                    segment_ids, segment_masks)
from .plots import plot_curves
from .sample_data import phantom_to_scene, segmentation_from_labels
from .scene_fit import (compute_scene_fit, NOT_MAPS, output_name, prepare_scene_fit, publish_scene_fit,
                        require_acquisition, run_scene_fit, SceneFitRequest, statistics_regions, t10_map_seconds)
from .sequences import (acquisition_from_sequence, FLIP_ANGLE, FRAME_LABEL_UNITS, FRAME_LABELS, KIND_ATTRIBUTE,
                        load_sequence, REPETITION_TIME, sequence_from_series, series_from_sequence, series_grid,
                        series_header, vfa_from_sequence, voxel_index_at_ras)
from .input_function_nodes import (AIF_SOURCES, chosen_segment, DETECTED_NAME, detect_input_function,
                                   detect_scene_input_function, input_function_from_nodes,
                                   publish_detected_input_function, publish_run_detection, roi_mask)
from .tables import Regions, save_table_csv, statistics_rows, statistics_table, table_from_rows, table_rows
from .volumes import reference_volume, volume_array, volume_geometry

__all__ = ["acquisition_from_sequence", "AIF_BOX_VOXELS", "AIF_SOURCES", "child_python", "chosen_segment",
           "colour_node", "compute_scene_fit", "default_colour_for_map", "detect_input_function",
           "detect_scene_input_function", "DETECTED_NAME", "detected_input_function_files", "find_output_node",
           "FLIP_ANGLE", "FRAME_LABEL_UNITS", "FRAME_LABELS", "hide_nan_voxels", "input_function_from_nodes",
           "KIND_ATTRIBUTE", "load_sequence", "mask_from_labelmap", "mask_from_node", "mask_from_roi",
           "mask_from_segment", "mean_curve_in_mask", "NOT_MAPS", "OUTPUT_MAP_ATTRIBUTE", "output_name",
           "phantom_to_scene", "place_roi_on_series", "plot_curves", "prepare_scene_fit",
           "publish_detected_input_function", "publish_run_detection", "publish_scene_fit", "reference_volume",
           "Regions", "REPETITION_TIME", "require_acquisition", "robust_window", "roi_around_mask", "roi_mask",
           "run_scene_fit", "save_table_csv", "scene_fit_place", "SceneFitRequest", "segment_ids", "segment_masks",
           "segmentation_from_labels", "sequence_from_series", "series_from_sequence", "series_grid", "series_header",
           "start_scene_fit", "statistics_regions", "statistics_rows", "statistics_table", "status_colour_table",
           "status_entries", "STATUS_TABLE", "t10_map_seconds", "table_from_rows", "table_rows", "UNITS_ATTRIBUTE",
           "update_volume_from_array", "vfa_from_sequence", "volume_array", "volume_geometry", "voxel_index_at_ras"]
