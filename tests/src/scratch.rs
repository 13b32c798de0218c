//! Scratch directories for tests: fresh, empty, unique (tests run in threads and processes at
//! once), and removed with everything in them when dropped, so a test run leaves nothing in the
//! system's temporary directory.

use std::ops::Deref;
use std::path::Path;

/// A fresh empty directory, removed when dropped. Derefs to its [`Path`].
#[derive(Debug)]
pub struct Scratch(tempfile::TempDir);

/// A new scratch directory named `<tag>-<random>` in the system's temporary directory.
pub fn scratch(tag: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{tag}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot make a scratch directory for {tag}: {e}"));
    Scratch(dir)
}

impl Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_directory_is_fresh_and_gone_when_dropped() {
        let (a, b) = (scratch("it-scratch"), scratch("it-scratch"));
        assert_ne!(a.to_path_buf(), b.to_path_buf());
        std::fs::write(a.join("file"), "x").unwrap();
        std::fs::create_dir(a.join("sub")).unwrap();
        let path = a.to_path_buf();
        assert!(
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("it-scratch-")
        );
        drop(a);
        assert!(!path.exists());
    }
}
