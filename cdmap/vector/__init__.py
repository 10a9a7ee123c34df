"""Change polygons: raster -> vector (streamed), the vector formats, ground areas, and reading label polygons.

* :mod:`cdmap.vector.polygonize`: :func:`vectorize_raster`, :class:`VectorStats`;
* :mod:`cdmap.vector.source`: reading the change raster (validity, what is change);
* :mod:`cdmap.vector.measure`: the metric frame and :func:`pixel_area_m2_rows`, the one area rule;
* :mod:`cdmap.vector.write`: :data:`FORMATS`, :func:`format_from_path`, writing and replacing the output;
* :mod:`cdmap.vector.labels`: :func:`read_polygons`, :func:`rasterize_polygons`, :data:`VECTOR_SUFFIXES`.
"""

from cdmap.vector.labels import VECTOR_SUFFIXES, rasterize_polygons, read_polygons
from cdmap.vector.measure import pixel_area_m2_rows
from cdmap.vector.polygonize import VectorStats, vectorize_raster
from cdmap.vector.write import FORMATS, check_format_name, format_from_path

__all__ = [
    "FORMATS",
    "VECTOR_SUFFIXES",
    "VectorStats",
    "check_format_name",
    "format_from_path",
    "pixel_area_m2_rows",
    "rasterize_polygons",
    "read_polygons",
    "vectorize_raster",
]
