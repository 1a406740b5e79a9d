"""Files the toolkit writes: ownership markers, locks, atomic writes, full disks."""
