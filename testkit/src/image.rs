//! Deterministic OCI test images (work in progress).
