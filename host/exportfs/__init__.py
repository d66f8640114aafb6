"""The parts of `host.backend.ExportFS`, by idea: what confines it to the export
(`confined`), and the operations beyond the first ones: links and special files
(`links`), extended attributes (`xattrs`), space and extents (`extents`)."""
