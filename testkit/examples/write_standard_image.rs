//! Writes the full-size standard test image to an OCI layout and prints how long it took.
//! Usage: cargo run -p stoker-testkit --example write_standard_image -- DIR

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: write_standard_image DIR")?;
    let image = stoker_testkit::image::standard_test_image();
    let start = Instant::now();
    let written = image.write_layout(std::path::Path::new(&dir), "v1")?;
    println!("wrote {} in {:?}", written.manifest.digest, start.elapsed());
    let start = Instant::now();
    let tree = image.expected_tree()?;
    println!(
        "expected tree: {} entries in {:?}",
        tree.len(),
        start.elapsed()
    );
    Ok(())
}
