//! What a `REPO_CLONE` argument must be: the top of a non-bare work tree with an `origin`
//! remote, used by one tinyci process at a time. Anything else is refused at start with a
//! message that says what to pass instead.

use std::path::{Path, PathBuf};

use super::{GitError, GitErrorKind};
use crate::lock::DirLock;

/// Where a clone's commits come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A repository on this machine (a path or `file://`): its object directory can be
    /// borrowed instead of fetched from.
    Local {
        /// The URL as configured.
        url: String,
        /// Its object directory.
        objects: PathBuf,
    },
    /// Anything git reaches over a transport: `ssh://`, `user@host:path`, `git://`, `http(s)://`…
    Remote {
        /// The URL as configured.
        url: String,
    },
}

impl Origin {
    /// The URL as configured in the clone.
    pub fn url(&self) -> &str {
        match self {
            Origin::Local { url, .. } | Origin::Remote { url } => url,
        }
    }
}

/// A validated clone, locked for this process until dropped.
#[derive(Debug)]
pub struct Clone {
    /// The top of the work tree, canonical.
    pub path: PathBuf,
    /// Its `.git` directory.
    pub git_dir: PathBuf,
    /// Its `origin`.
    pub origin: Origin,
    _lock: DirLock,
}

fn usage(path: &Path, message: String) -> GitError {
    GitError::new(
        format!("cannot use {} as the clone", path.display()),
        message,
        GitErrorKind::Usage,
    )
}

/// Whether `dir` looks like a git directory (`.git` or a bare repository).
fn is_git_dir(dir: &Path) -> bool {
    dir.join("HEAD").is_file() && dir.join("objects").is_dir() && dir.join("refs").is_dir()
}

impl Clone {
    /// Checks that `path` is the top of a non-bare work tree with an `origin`, and takes the
    /// exclusive lock on it.
    pub fn open(path: &Path) -> Result<Clone, GitError> {
        let md = match std::fs::metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(usage(
                    path,
                    format!(
                        "it does not exist; make a clone of the repository to test with `git clone ORIGIN {}` and pass that",
                        path.display()
                    ),
                ))
            }
            Err(e) => return Err(usage(path, e.to_string())),
        };
        if !md.is_dir() {
            return Err(usage(
                path,
                "it is not a directory; pass the top of a git clone's work tree".into(),
            ));
        }
        let top = std::fs::canonicalize(path).map_err(|e| usage(path, e.to_string()))?;
        let dot_git = top.join(".git");
        if is_git_dir(&top) && !dot_git.exists() {
            return Err(usage(
                path,
                if top.file_name().is_some_and(|n| n == ".git") {
                    let parent = top.parent().unwrap_or(&top);
                    format!(
                        "it is a clone's .git directory, not its work tree; pass {}",
                        parent.display()
                    )
                } else {
                    format!(
                        "it is a bare repository (no work tree); make a clone with `git clone {} DIR` and pass DIR",
                        top.display()
                    )
                },
            ));
        }
        match std::fs::symlink_metadata(&dot_git) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(usage(
                    path,
                    "its .git is a file (a linked worktree or a submodule); give tinyci a clone of its own: `git clone ORIGIN DIR`".into(),
                ))
            }
            Err(_) => {
                let enclosing = top.ancestors().skip(1).find(|a| a.join(".git").exists());
                return Err(usage(
                    path,
                    match enclosing {
                        Some(t) => format!(
                            "it is a directory inside the work tree of {}; pass the top of the work tree",
                            t.display()
                        ),
                        None => format!(
                            "it is not a git clone; make one with `git clone ORIGIN {}`",
                            top.display()
                        ),
                    },
                ));
            }
        }
        let repo = git2::Repository::open(&top).map_err(|e| {
            usage(
                path,
                format!("git cannot open it ({}); is its .git damaged?", e.message()),
            )
        })?;
        if repo.is_bare() {
            return Err(usage(
                path,
                "its configuration says it is bare (core.bare); pass a clone with a work tree"
                    .into(),
            ));
        }
        let url = repo
            .find_remote("origin")
            .ok()
            .and_then(|r| r.url().map(str::to_owned))
            .ok_or_else(|| {
                usage(
                    path,
                    format!(
                        "it has no remote named origin; add one with `git -C {} remote add origin URL`",
                        top.display()
                    ),
                )
            })?;
        let origin = classify(&url, &top);
        let lock = DirLock::acquire(&top, "tinyci runner or observer").map_err(|e| {
            GitError::new(
                format!("cannot use {} as the clone", path.display()),
                e.to_string(),
                GitErrorKind::Usage,
            )
        })?;
        Ok(Clone {
            git_dir: dot_git,
            path: top,
            origin,
            _lock: lock,
        })
    }
}

/// Tells a local origin from a remote one, as git does: a URL with a scheme other than
/// `file://`, or of the scp form `[user@]host:path` (a colon before any slash), is remote;
/// anything else is a path, relative to the clone.
fn classify(url: &str, clone: &Path) -> Origin {
    let remote = || Origin::Remote {
        url: url.to_owned(),
    };
    let dir = if let Some(p) = url.strip_prefix("file://") {
        PathBuf::from(p)
    } else if url.contains("://")
        || url
            .split('/')
            .next()
            .is_some_and(|first| first.contains(':'))
    {
        return remote();
    } else {
        clone.join(url)
    };
    let objects = [dir.join(".git").join("objects"), dir.join("objects")]
        .into_iter()
        .find(|d| d.join("pack").is_dir())
        .and_then(|d| std::fs::canonicalize(d).ok());
    match objects {
        Some(objects) => Origin::Local {
            url: url.to_owned(),
            objects,
        },
        // A path that is not (or not yet) a repository: git will say so when it fetches.
        None => remote(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_classified_as_git_does() {
        let tmp = tempfile::tempdir().unwrap();
        let bare = tmp.path().join("m.git");
        std::fs::create_dir_all(bare.join("objects/pack")).unwrap();
        for url in [
            "ssh://git@example.com/x.git",
            "git@example.com:x.git",
            "https://example.com/x.git",
            "git://127.0.0.1:9/x",
            "/nonexistent/repo",
        ] {
            assert!(
                matches!(classify(url, tmp.path()), Origin::Remote { .. }),
                "{url}"
            );
        }
        for url in [
            bare.display().to_string(),
            format!("file://{}", bare.display()),
            "../m.git".to_string(),
        ] {
            let clone = tmp.path().join("clone");
            std::fs::create_dir_all(&clone).unwrap();
            match classify(&url, &clone) {
                Origin::Local { objects, .. } => {
                    assert_eq!(
                        objects,
                        std::fs::canonicalize(bare.join("objects")).unwrap()
                    )
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
