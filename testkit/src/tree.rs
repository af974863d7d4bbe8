//! Filesystem tree snapshots (work in progress).
