//! What a run records while it runs: [`Metrics`], one JSON object per line, and a [`progress`]
//! bar.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Metrics written as one JSON object per line.
pub struct Metrics {
    file: std::fs::File,
    pub path: PathBuf,
}

impl Metrics {
    pub fn create(path: &Path) -> crate::Result<Metrics> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Metrics {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Reopen a run's metrics to continue it after `step`: records of later steps (written
    /// after the checkpoint being resumed from) are dropped, the rest kept, and new ones appended.
    pub fn resume(path: &Path, step: u32) -> crate::Result<Metrics> {
        let name = path.display();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // A crash in the middle of a write can leave a last line without its newline: it is
        // a record of a step after the checkpoint (records are written after their step), so
        // it goes with them.
        let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
        let mut kept = String::new();
        for line in whole.lines() {
            let record: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{name}: {e} in `{line}`"))?;
            if record["step"]
                .as_u64()
                .is_some_and(|s| s <= u64::from(step))
            {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        transformer::tensor_file::write_file_atomically(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(Metrics {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `value` as one line, in a single write (a record is never interleaved with
    /// another, and a crash leaves at most the last one torn).
    pub fn write(&mut self, value: serde_json::Value) -> crate::Result<()> {
        let line = format!("{value}\n");
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        Ok(())
    }
}

/// The held-out losses a run's metrics recorded (`eval_loss` records), as `(step, loss)` in
/// the order written.
pub fn eval_losses(path: &Path) -> crate::Result<Vec<(u32, f32)>> {
    let name = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: {e}"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let record: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{name}: {e} in `{line}`"))?;
        if let (Some(step), Some(loss)) = (record["step"].as_u64(), record["eval_loss"].as_f64()) {
            out.push((step as u32, loss as f32));
        }
    }
    Ok(out)
}

/// A progress bar showing step, loss, tokens/s and time left.
pub fn progress(steps: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}}"
        ))
        .expect("a valid progress template")
        .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record torn by a crash (no newline at the end) and the records after the checkpoint
    /// are dropped when a run resumes; the kept ones stay and new ones follow.
    #[test]
    fn resumed_metrics_drop_a_torn_last_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let path = dir.join("metrics.jsonl");
        let text = "{\"step\":1}\n{\"step\":2,\"eval_loss\":1}\n{\"step\":3}\n{\"step\":4,\"lo";
        std::fs::write(&path, text).unwrap();
        let mut metrics = Metrics::resume(&path, 2).unwrap();
        metrics.write(serde_json::json!({"step": 3})).unwrap();
        let back = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            back,
            "{\"step\":1}\n{\"step\":2,\"eval_loss\":1}\n{\"step\":3}\n"
        );
        assert_eq!(eval_losses(&path).unwrap(), [(2, 1.0)]);
    }
}
