//! The node's image directory (`--image-dir`): the only place custom
//! kernels and initrds are booted from.
//!
//! A VM names its kernel and initrd by **image name**, a relative path inside
//! the image directory of the node that runs it ([`is_image_name`]). Never by
//! a host path: whoever may create VMs must not make a node read any file it
//! can open (`--kernel /etc/shadow` would hand it to QEMU, and its bytes
//! could come back through the guest's console).
//!
//! Two checks enforce that:
//! - the API edge refuses anything but an image name (`blixard-core`'s
//!   `validate::image_names`, which uses [`is_image_name`] and
//!   [`IMAGE_NAME_RULE`]);
//! - the node that boots the VM resolves the name with [`ImageDir::resolve`]:
//!   it canonicalizes the path (following every symlink) and refuses what
//!   lands outside the directory (a symlink out of it), is not a regular
//!   file, or does not exist. The VM then fails with that reason.
//!
//! The second check is the one that matters: it also covers VMs recorded by
//! versions from before image names, whose kernel is an absolute host path
//! (the replicated state keeps them as they were). Such a VM boots only if
//! its path lies inside the image directory.
use std::fs;
use std::path::{Path, PathBuf};

use crate::backend::VmError;

/// Longest image name, in bytes.
pub const MAX_IMAGE_NAME_LEN: usize = 255;

/// What [`is_image_name`] accepts, for error messages.
pub const IMAGE_NAME_RULE: &str = "a file name in the node's image directory (--image-dir): 1-255 \
characters of A-Z, a-z, 0-9, '.', '_', '-', and '/' between subdirectories; no part empty or \
starting with '.' (so no absolute path, no '..')";

/// The directory under a node's data dir that `node start` uses when no
/// `--image-dir` is given.
pub const DEFAULT_SUBDIR: &str = "images";

/// An image name: 1 to [`MAX_IMAGE_NAME_LEN`] bytes, parts separated by
/// single `/` (subdirectories of the image directory), each part non-empty,
/// made of `A-Z a-z 0-9 . _ -` and not starting with `.`. So no absolute
/// path, no `.` or `..` part, no hidden file, no control or non-ASCII
/// character. A name can still be a symlink inside the directory: only
/// [`ImageDir::resolve`] on the node can tell where it leads.
///
/// Apply accepts what this accepts (`blixard-core`'s `validate::boot`), so
/// the rule may grow to accept more, never shrink: a committed entry must
/// apply the same on every build.
pub fn is_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IMAGE_NAME_LEN
        && name.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// A node's image directory. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDir {
    dir: PathBuf,
}

impl ImageDir {
    /// `dir` should be absolute (QEMU runs in the VM's own directory); it
    /// need not exist yet, nor stay the same: it is resolved at every boot.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The file a VM's `what` ("kernel", "initrd") names, as a canonical
    /// path (no symlink left in it) to hand to the VMM. `file` is an image
    /// name, or an absolute path recorded before image names existed
    /// (accepted only if it lies inside the directory). Refuses, with a
    /// [`VmError::Config`] that says why and states the rule: anything else,
    /// anything that resolves outside the directory, a file that does not
    /// exist, is not a regular file, or cannot be opened.
    ///
    /// An absolute path outside the directory is refused without touching
    /// it, so an error never tells whether some host file exists.
    pub fn resolve(&self, what: &str, file: &Path) -> Result<PathBuf, VmError> {
        let shown = file.display();
        let refused = |why: String| VmError::Config(format!("{what} \"{shown}\" is refused: {why}"));
        let root = fs::canonicalize(&self.dir).map_err(|e| {
            VmError::Config(format!(
                "{what} \"{shown}\" cannot be booted: this node's image directory {} is not usable ({e}); \
                 create it and put the file there",
                self.dir.display()
            ))
        })?;
        let candidate = if file.is_absolute() {
            // A record from before image names: a host path, bootable only
            // inside the directory (as configured, or as it resolves).
            if !file.starts_with(&self.dir) && !file.starts_with(&root) {
                return Err(refused(format!(
                    "it is outside this node's image directory {}; it must be {IMAGE_NAME_RULE}",
                    self.dir.display()
                )));
            }
            file.to_path_buf()
        } else {
            match file.to_str() {
                Some(name) if is_image_name(name) => root.join(name),
                _ => return Err(refused(format!("it must be {IMAGE_NAME_RULE}"))),
            }
        };
        let real = fs::canonicalize(&candidate).map_err(|e| {
            VmError::Config(format!(
                "{what} \"{shown}\" is not in this node's image directory {} ({e}): copy the file there",
                self.dir.display()
            ))
        })?;
        if !real.starts_with(&root) {
            return Err(refused(format!(
                "it resolves to {}, outside this node's image directory {}; it must be {IMAGE_NAME_RULE}",
                real.display(),
                self.dir.display()
            )));
        }
        match fs::File::open(&real) {
            Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => Ok(real),
            Ok(_) => Err(VmError::Config(format!(
                "{what} \"{shown}\" in this node's image directory {} is not a regular file",
                self.dir.display()
            ))),
            Err(e) => Err(VmError::Config(format!(
                "{what} \"{shown}\" in this node's image directory {} cannot be read: {e}",
                self.dir.display()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn image_names() {
        let long = "a".repeat(MAX_IMAGE_NAME_LEN);
        for good in
            ["vmlinuz", "initrd.img", "vmlinuz-6.1.0-57-cloud-amd64", "custom/vmlinuz", "a/b/c_d", &long]
        {
            assert!(is_image_name(good), "{good:?} refused");
        }
        let too_long = "a".repeat(MAX_IMAGE_NAME_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/../../b",
            "a/./b",
            "/etc/shadow",
            "/",
            "a/",
            "a//b",
            ".hidden",
            "dir/.hidden",
            "a\0b",
            "a b",
            "a\nb",
            "a\\b",
            "vmlinüz",
            "~/vmlinuz",
            "$HOME",
            &too_long,
        ] {
            assert!(!is_image_name(bad), "{bad:?} accepted");
        }
    }

    /// An image dir with `vmlinuz` (a file), `sub/initrd` (a file in a
    /// subdirectory), and a file outside it.
    fn setup() -> (tempfile::TempDir, ImageDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("images");
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("vmlinuz"), b"kernel").unwrap();
        fs::write(dir.join("sub/initrd"), b"initrd").unwrap();
        let outside = tmp.path().join("secret");
        fs::write(&outside, b"secret").unwrap();
        (tmp, ImageDir::new(dir), outside)
    }

    fn config_error(r: Result<PathBuf, VmError>) -> String {
        match r {
            Err(VmError::Config(msg)) => msg,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    #[test]
    fn regular_files_inside_resolve_to_their_canonical_path() {
        let (_tmp, images, _) = setup();
        let root = fs::canonicalize(images.path()).unwrap();
        assert_eq!(images.resolve("kernel", Path::new("vmlinuz")).unwrap(), root.join("vmlinuz"));
        assert_eq!(images.resolve("initrd", Path::new("sub/initrd")).unwrap(), root.join("sub/initrd"));
        // A symlink that stays inside is fine; what is booted is its target.
        symlink("vmlinuz", images.path().join("current")).unwrap();
        assert_eq!(images.resolve("kernel", Path::new("current")).unwrap(), root.join("vmlinuz"));
    }

    #[test]
    fn symlinks_out_of_the_directory_are_refused() {
        let (_tmp, images, outside) = setup();
        symlink(&outside, images.path().join("escape")).unwrap();
        let msg = config_error(images.resolve("kernel", Path::new("escape")));
        assert!(msg.starts_with("kernel \"escape\" is refused: it resolves to"), "{msg}");
        assert!(msg.contains(&outside.display().to_string()) && msg.contains(IMAGE_NAME_RULE), "{msg}");
        // Through a symlinked subdirectory too.
        symlink(outside.parent().unwrap(), images.path().join("up")).unwrap();
        let msg = config_error(images.resolve("kernel", Path::new("up/secret")));
        assert!(msg.contains("outside this node's image directory"), "{msg}");
        // And with a relative link target.
        symlink("../secret", images.path().join("rel")).unwrap();
        let msg = config_error(images.resolve("initrd", Path::new("rel")));
        assert!(msg.starts_with("initrd \"rel\" is refused"), "{msg}");
    }

    #[test]
    fn bad_names_missing_files_and_directories_are_clear_errors() {
        let (_tmp, images, outside) = setup();
        for bad in ["../secret", "a/../../secret", "", "."] {
            let msg = config_error(images.resolve("kernel", Path::new(bad)));
            assert!(msg.contains(IMAGE_NAME_RULE), "{bad:?}: {msg}");
        }
        let msg = config_error(images.resolve("kernel", Path::new("nope")));
        assert!(msg.starts_with("kernel \"nope\" is not in this node's image directory"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
        let msg = config_error(images.resolve("kernel", Path::new("sub")));
        assert!(msg.contains("is not a regular file"), "{msg}");
        // The directory itself missing says so.
        let gone = ImageDir::new(outside.with_file_name("no-such-dir"));
        let msg = config_error(gone.resolve("kernel", Path::new("vmlinuz")));
        assert!(msg.contains("image directory") && msg.contains("not usable"), "{msg}");
    }

    #[test]
    fn absolute_paths_from_old_records_boot_only_inside() {
        let (_tmp, images, outside) = setup();
        let root = fs::canonicalize(images.path()).unwrap();
        let inside = images.path().join("vmlinuz");
        assert_eq!(images.resolve("kernel", &inside).unwrap(), root.join("vmlinuz"));
        for bad in [outside.clone(), PathBuf::from("/etc/shadow"), images.path().join("../secret")] {
            let msg = config_error(images.resolve("kernel", &bad));
            assert!(msg.contains("refused") && msg.contains(IMAGE_NAME_RULE), "{bad:?}: {msg}");
        }
        // Outside the directory, not even touched: a missing host file gets
        // the same answer as an existing one.
        let msg = config_error(images.resolve("kernel", Path::new("/nonexistent/vmlinuz")));
        assert!(msg.contains("is outside this node's image directory"), "{msg}");
    }

    #[test]
    fn a_symlinked_image_directory_works_both_ways() {
        let (tmp, images, _) = setup();
        let link = tmp.path().join("images-link");
        symlink(images.path(), &link).unwrap();
        let via_link = ImageDir::new(&link);
        let root = fs::canonicalize(images.path()).unwrap();
        assert_eq!(via_link.resolve("kernel", Path::new("vmlinuz")).unwrap(), root.join("vmlinuz"));
        assert_eq!(via_link.resolve("kernel", &link.join("vmlinuz")).unwrap(), root.join("vmlinuz"));
        assert_eq!(via_link.resolve("kernel", &root.join("vmlinuz")).unwrap(), root.join("vmlinuz"));
    }
}
