//! The lazy mount as an overlayfs lower layer, as containers use it: files read
//! through the overlay are right whether the lazy filesystem serves them itself or
//! passes them through to a cached backing file.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use common::*;
use stoker_format::Tree;
use stoker_lazyfs::MountOptions;

fn image() -> TestImage {
    let mut b = ImageBuilder::new();
    b.file(
        Tree::ROOT,
        b"warm",
        &pattern(1, 100_000),
        1 << 20,
        meta(0o755, 0, 0),
    );
    // A real executable, to run through the overlay as a container would.
    let program = std::fs::read("/bin/true").expect("read /bin/true");
    b.file(Tree::ROOT, b"true", &program, 1 << 20, meta(0o755, 0, 0));
    b.file(
        Tree::ROOT,
        b"cold",
        &pattern(2, 50_000),
        1 << 20,
        meta(0o644, 0, 0),
    );
    b.finish()
}

/// An overlay over `lower`, unmounted when dropped.
struct Overlay {
    merged: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Overlay {
    fn mount(lower: &Path) -> Overlay {
        let dir = tempfile::tempdir().expect("overlay dir");
        let (upper, work, merged) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("merged"),
        );
        for d in [&upper, &work, &merged] {
            std::fs::create_dir(d).expect("overlay dirs");
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let status = std::process::Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&merged)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount overlay over {}", lower.display());
        Overlay { merged, _dir: dir }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Ok(path) = CString::new(self.merged.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path that outlives the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[test]
fn files_read_through_an_overlay_are_right_with_and_without_passthrough() {
    let test = "files_read_through_an_overlay_are_right_with_and_without_passthrough";
    if !fuse_available(test) {
        return;
    }
    let image = image();
    let mounted = mount_image(&image, 1 << 30, MountOptions::default(), |cache| {
        image.warm(cache, b"warm");
        image.warm(cache, b"true");
    });
    let overlay = Overlay::mount(&mounted.path(""));
    let before = mounted.handle.counters();
    let warm = std::fs::read(overlay.merged.join("warm")).expect("read warm through the overlay");
    assert!(warm == image.content(b"warm"), "warm file bytes");
    let cold = std::fs::read(overlay.merged.join("cold")).expect("read cold through the overlay");
    assert!(cold == image.content(b"cold"), "cold file bytes");
    let ran = std::process::Command::new(overlay.merged.join("true"))
        .status()
        .expect("execute a warm program through the overlay");
    assert!(ran.success(), "the program ran: {ran}");
    let after = mounted.handle.counters();
    if mounted.handle.passthrough_enabled() {
        assert_eq!(
            after.passthrough_opens,
            before.passthrough_opens + 2,
            "the warm file and the program passed through"
        );
    } else {
        eprintln!(
            "{test}: the kernel does not offer FUSE passthrough; only the plain path was checked"
        );
    }
}
