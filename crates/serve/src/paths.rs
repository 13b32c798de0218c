//! Which directories `POST /v1/adapters` may load from: only directories under the configured
//! adapter roots (`--adapter-dir`). A path is resolved (symlinks and `..` followed, by the
//! operating system) and must then lie under a resolved root; anything else is refused with
//! the same 403 and the same message whether or not it exists, so the answer reveals nothing
//! about files outside the roots.
//!
//! A relative path is taken relative to each root in turn (the first that holds it wins).

use std::path::{Component, Path, PathBuf};

use axum::http::StatusCode;

use crate::error::ApiError;

/// The resolved adapter roots.
#[derive(Clone, Debug, Default)]
pub struct Roots(Vec<PathBuf>);

fn forbidden() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "adapters load only from directories under the server's adapter roots (--adapter-dir)",
    )
}

impl Roots {
    /// Resolves each root; a root that does not resolve is an error naming it.
    pub fn new(dirs: &[PathBuf]) -> Result<Roots, String> {
        dirs.iter()
            .map(|d| {
                d.canonicalize()
                    .map_err(|e| format!("adapter directory {}: {e}", d.display()))
            })
            .collect::<Result<_, _>>()
            .map(Roots)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The resolved directory `requested` names, if it lies under a root; else 403. A path
    /// inside a root that does not exist is a 400 (it tells nothing about other places).
    pub fn resolve(&self, requested: &str) -> Result<PathBuf, ApiError> {
        let path = Path::new(requested);
        let candidates: Vec<PathBuf> = if path.is_absolute() {
            vec![path.to_path_buf()]
        } else {
            self.0.iter().map(|r| r.join(path)).collect()
        };
        for c in &candidates {
            if let Ok(real) = c.canonicalize()
                && self.0.iter().any(|r| real.starts_with(r))
                && real.is_dir()
            {
                return Ok(real);
            }
        }
        // Not found, or found outside. Only a path made of plain names below a root is
        // reported as missing; anything else gets the same refusal as a path outside.
        let plain = path.components().all(|c| matches!(c, Component::Normal(_)))
            || (path.is_absolute()
                && self.0.iter().any(|r| {
                    path.strip_prefix(r).is_ok_and(|rest| {
                        rest.components().all(|c| matches!(c, Component::Normal(_)))
                    })
                }));
        let under_root_exists = candidates.iter().any(|c| {
            // The nearest existing ancestor must itself resolve inside a root.
            let mut p = c.as_path();
            loop {
                if let Ok(real) = p.canonicalize() {
                    return self.0.iter().any(|r| real.starts_with(r));
                }
                match p.parent() {
                    Some(parent) => p = parent,
                    None => return false,
                }
            }
        });
        if plain && under_root_exists && !self.0.is_empty() {
            return Err(ApiError::field(
                "path",
                format!("no adapter directory `{requested}` under the adapter roots"),
            ));
        }
        Err(forbidden())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_under_a_root_resolve() {
        let base = std::env::temp_dir().join(format!("serve-roots-{}", std::process::id()));
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let roots = Roots::new(std::slice::from_ref(&root)).unwrap();
        let real_a = root.join("a").canonicalize().unwrap();
        assert_eq!(roots.resolve("a").unwrap(), real_a);
        assert_eq!(
            roots.resolve(root.join("a").to_str().unwrap()).unwrap(),
            real_a
        );
        let refused = |p: &str| roots.resolve(p).unwrap_err().status;
        assert_eq!(refused("../outside"), StatusCode::FORBIDDEN);
        assert_eq!(refused("a/../../outside"), StatusCode::FORBIDDEN);
        assert_eq!(refused(outside.to_str().unwrap()), StatusCode::FORBIDDEN);
        assert_eq!(refused("/nonexistent/elsewhere"), StatusCode::FORBIDDEN);
        assert_eq!(refused("../no-such-thing"), StatusCode::FORBIDDEN);
        #[cfg(unix)]
        {
            assert_eq!(refused("link"), StatusCode::FORBIDDEN);
            assert_eq!(refused("link/missing"), StatusCode::FORBIDDEN);
        }
        assert_eq!(refused("missing"), StatusCode::BAD_REQUEST);
        assert_eq!(
            Roots::default().resolve("a").unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
