//! Deterministic OCI test images, written in Rust into OCI image-layout directories.
//!
//! - [`Entry`] / [`Generator`]: tar entries of every kind, with raw path bytes, modes,
//!   owners, mtimes and xattrs; large file contents generated on demand.
//! - [`ImageBuilder`]: layers → `oci-layout`, `index.json` and blobs (config with correct
//!   diff_ids, manifest); gzip, zstd or uncompressed layers; [`write_multi_platform_layout`]
//!   for an image index. [`ImageBuilder::expected_tree`] gives the merged tree by OCI layer
//!   semantics, the reference for comparisons.
//! - Ready-made images: [`standard_test_image`], [`large_file_versions`],
//!   [`malicious_layers`], [`multi_platform_images`].
//! - [`push_layout`] (skopeo) and [`unpack_reference`] (umoci).

mod entry;
mod expected;
mod layout;
mod samples;
mod tar_writer;
mod tools;

pub use entry::{
    DEFAULT_MTIME, Entry, EntryKind, FileContent, Generator, GeneratorReader, file_capability,
};
pub use layout::{
    ANNOTATION_REF_NAME, BlobDescriptor, Compression, ImageBuilder, Layer, LayerContent,
    MEDIA_TYPE_CONFIG, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, Platform, WrittenImage, WrittenIndex,
    WrittenLayer, blob_path, write_multi_platform_layout,
};
pub use samples::{
    LargeFileVersions, MaliciousImage, StandardImageSizes, large_file_versions, malicious_layers,
    multi_platform_images, paths, standard_test_image, standard_test_image_with,
};
pub use tar_writer::layer_tar;
pub use tools::{push_layout, unpack_reference};
