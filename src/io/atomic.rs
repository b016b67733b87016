//! Outputs that appear whole or not at all: a file, a file written by a library that opens it
//! itself (the plots), or a whole directory (prepared datasets, checkpoints) is built under a
//! hidden temporary name beside its final one, flushed, and renamed into place by `commit`.
//! Dropped before `commit` (an error on the way), the temporary is removed, so a failed write
//! leaves nothing behind under any name. A crash (kill -9) can leave a temporary; the directory's
//! name is fixed, so the next run finds and replaces it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

/// The directory holding `path`; `.` for a bare file name (`Path::parent` gives "" then).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync a directory so that renames and removals in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir)
        .with_context(|| format!("opening directory {} to fsync it", dir.display()))?;
    d.sync_all()
        .with_context(|| format!("fsync of directory {}", dir.display()))
}

/// The last component of `path`, or an error naming it.
fn file_name(path: &Path) -> Result<String> {
    Ok(path
        .file_name()
        .with_context(|| format!("cannot write {}: the path names no file", path.display()))?
        .to_string_lossy()
        .into_owned())
}

/// A temporary file path beside `path`, hidden, and unique per process and call (so concurrent
/// writers never share one); it keeps `path`'s extension, which some writers read the format from.
pub struct AtomicPath {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl AtomicPath {
    pub fn new(path: &Path) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = file_name(path)?;
        let ext = path
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        let tmp = parent_dir(path).join(format!(
            ".{name}.tmp.{}.{}{ext}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// fsync the written file, rename it over the final path, fsync the directory.
    pub fn commit(mut self) -> Result<()> {
        File::open(&self.tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| {
                format!(
                    "fsync of {} (for {})",
                    self.tmp.display(),
                    self.path.display()
                )
            })?;
        self.rename_into_place()
    }

    fn rename_into_place(&mut self) -> Result<()> {
        fs::rename(&self.tmp, &self.path).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.path.display())
        })?;
        self.committed = true;
        sync_dir(parent_dir(&self.path))
    }
}

impl Drop for AtomicPath {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A file being written under an `AtomicPath`.
pub(crate) struct AtomicFile {
    file: File,
    at: AtomicPath,
}

impl AtomicFile {
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let at = AtomicPath::new(path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(at.tmp())
            .with_context(|| {
                format!(
                    "creating temporary file {} to write {}",
                    at.tmp().display(),
                    path.display()
                )
            })?;
        Ok(Self { file, at })
    }

    pub(crate) fn file(&mut self) -> &mut File {
        &mut self.file
    }

    pub(crate) fn tmp_path(&self) -> &Path {
        self.at.tmp()
    }

    pub(crate) fn commit(self) -> Result<()> {
        let AtomicFile { file, mut at } = self;
        file.sync_all().with_context(|| {
            format!("fsync of {} (for {})", at.tmp.display(), at.path.display())
        })?;
        drop(file);
        at.rename_into_place()
    }
}

/// Write bytes to `path` atomically: tmp file in the same dir, write, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    let tmp = f.tmp_path().to_path_buf();
    f.file()
        .write_all(bytes)
        .with_context(|| format!("writing {} (for {})", tmp.display(), path.display()))?;
    f.commit()
}

/// A directory built under `<parent>/.tmp-<name>` and renamed to `<parent>/<name>` by `commit`,
/// replacing an older one only once the new one is in place.
pub struct AtomicDir {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// The temporary name of the directory `path`: fixed, so that every rank of a job writes into
    /// the same one, and a crashed run's is found and replaced.
    pub fn temp_path(path: &Path) -> Result<PathBuf> {
        Ok(parent_dir(path).join(format!(".tmp-{}", file_name(path)?)))
    }

    /// A fresh, empty temporary directory for `path` (a stale one is removed; parents are
    /// created).
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = Self::temp_path(path)?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing the stale {}", tmp.display()))?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// fsync the directory, move an older `path` aside, rename, remove the older one, fsync the
    /// parent. If the rename fails, the older one is put back.
    pub fn commit(mut self) -> Result<()> {
        sync_dir(&self.tmp)?;
        let parent = parent_dir(&self.path).to_path_buf();
        let old = parent.join(format!(".old-{}", file_name(&self.path)?));
        if old.exists() {
            fs::remove_dir_all(&old)
                .with_context(|| format!("removing the stale {}", old.display()))?;
        }
        let replaced = self.path.exists();
        if replaced {
            fs::rename(&self.path, &old)
                .with_context(|| format!("moving the older {} aside", self.path.display()))?;
        }
        if let Err(e) = fs::rename(&self.tmp, &self.path) {
            if replaced {
                let _ = fs::rename(&old, &self.path);
            }
            return Err(e).with_context(|| {
                format!("renaming {} to {}", self.tmp.display(), self.path.display())
            });
        }
        self.committed = true;
        if replaced {
            fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        sync_dir(&parent)
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(names(dir.path()), vec!["a.json".to_string()]);
    }

    #[test]
    fn write_atomic_into_missing_dir_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no_such_dir").join("a.json");
        let err = write_atomic(&p, b"x").unwrap_err();
        assert!(format!("{err:#}").contains("a.json"), "{err:#}");
    }

    #[test]
    fn atomic_path_keeps_the_extension_and_cleans_up_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plot.png");
        let a = AtomicPath::new(&p).unwrap();
        assert_eq!(a.tmp().extension().unwrap(), "png");
        assert_eq!(a.tmp().parent().unwrap(), dir.path());
        fs::write(a.tmp(), b"half").unwrap();
        drop(a);
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        let a = AtomicPath::new(&p).unwrap();
        fs::write(a.tmp(), b"whole").unwrap();
        a.commit().unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"whole");
        assert_eq!(names(dir.path()), vec!["plot.png".to_string()]);
    }

    #[test]
    fn atomic_dir_appears_whole_replaces_the_older_and_vanishes_on_error() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("sub/ds");
        // A failed build (dropped) leaves nothing.
        let d = AtomicDir::create(&out).unwrap();
        assert_eq!(d.tmp(), root.path().join("sub/.tmp-ds"));
        fs::write(d.tmp().join("a"), b"1").unwrap();
        assert!(!out.exists());
        drop(d);
        assert!(names(&root.path().join("sub")).is_empty());
        // A committed one appears under its name.
        let d = AtomicDir::create(&out).unwrap();
        fs::write(d.tmp().join("a"), b"1").unwrap();
        d.commit().unwrap();
        assert_eq!(names(&out), vec!["a".to_string()]);
        // A stale temporary (a crash) is replaced; the new one replaces the older output whole.
        fs::create_dir_all(root.path().join("sub/.tmp-ds")).unwrap();
        fs::write(root.path().join("sub/.tmp-ds/stale"), b"x").unwrap();
        let d = AtomicDir::create(&out).unwrap();
        assert!(names(d.tmp()).is_empty());
        fs::write(d.tmp().join("b"), b"2").unwrap();
        d.commit().unwrap();
        assert_eq!(names(&out), vec!["b".to_string()]);
        assert_eq!(names(&root.path().join("sub")), vec!["ds".to_string()]);
    }
}
