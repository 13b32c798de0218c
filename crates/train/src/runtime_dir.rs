//! A private `XDG_RUNTIME_DIR` for the process when the environment has none.
//!
//! On Linux, Mesa's Vulkan device-select layer (loaded with any Mesa driver, lavapipe included)
//! asks the Wayland client library for the display while wgpu enumerates adapters. Without
//! `XDG_RUNTIME_DIR` (a fresh machine without a desktop session, a container, `ssh` without
//! `pam_systemd`) that library prints `error: XDG_RUNTIME_DIR is invalid or not set in the
//! environment.` on stderr, once per Vulkan instance: not our error, but the first thing a user
//! would read. Giving the process a runtime directory of its own silences it; nothing else reads
//! the directory (no Wayland socket is there, so the layer finds no display and keeps the
//! adapters' order). An environment that has a usable one is left as it is.

use std::path::{Path, PathBuf};

/// The environment variable.
pub const VAR: &str = "XDG_RUNTIME_DIR";

/// Whether `value` (the variable's value, if set) is what Wayland accepts: an absolute path to
/// an existing directory.
pub fn usable(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| {
        let path = Path::new(v);
        path.is_absolute() && path.is_dir()
    })
}

/// The directory to set as `XDG_RUNTIME_DIR`, when the environment lacks a usable one: the
/// user's own `train-runtime-<uid>` in the temporary directory, created with mode 0700. `None`
/// when the environment has one, off Linux, or when that directory cannot be made or is not
/// ours alone (then nothing is set and Mesa's line may appear).
pub fn missing() -> Option<PathBuf> {
    if !cfg!(target_os = "linux") || usable(std::env::var_os(VAR).as_deref()) {
        return None;
    }
    private_dir(&std::env::temp_dir())
}

/// `<tmp>/train-runtime-<uid>`, created 0700 if absent; `None` unless it is a real directory
/// (not a link) owned by this user and closed to everyone else.
#[cfg(unix)]
fn private_dir(tmp: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    let dir = tmp.join(format!("train-runtime-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let private = meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0;
    private.then_some(dir)
}

#[cfg(not(unix))]
fn private_dir(_: &Path) -> Option<PathBuf> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn only_an_absolute_existing_directory_is_usable() {
        let tmp = std::env::temp_dir();
        assert!(usable(Some(tmp.as_os_str())));
        assert!(!usable(None));
        assert!(!usable(Some(OsStr::new(""))));
        assert!(!usable(Some(OsStr::new("relative/dir"))));
        assert!(!usable(Some(tmp.join("no-such-dir-of-train").as_os_str())));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_private_dir_is_made_0700_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = private_dir(tmp.path()).expect("a private dir");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(private_dir(tmp.path()), Some(dir.clone()));
        // Opened to others, it is refused rather than used.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_dir(tmp.path()), None);
    }
}
