//! The whole state of a fine-tuning run, saved so that `--resume` continues it exactly: on the
//! CPU backend the resumed run's losses equal, bit for bit, those of a run never interrupted.
//!
//! One file, `<out>/checkpoint/state.safetensors`:
//!
//! | entry | what |
//! |---|---|
//! | `param/<name>` | each trainable parameter's value: for LoRA every A and B (the adapter), for full fine-tuning every weight |
//! | `adam_m/<name>`, `adam_v/<name>` | AdamW's moments of each parameter that has taken a step |
//! | `losses` | the training loss of every step so far (the loss plot is drawn from them) |
//! | header `__metadata__["state"]` | JSON [`Progress`]: optimizer step, AdamW's t, batches drawn, seed, the run's options |
//!
//! Tensors are keyed by parameter *name*: ids ([`autograd::ParamId`]) are only valid within
//! one process. Why this is the whole state:
//! - values, m, v and t are stored as f32, exactly;
//! - the data order ([`crate::batch::Batches`]) is a function of the seed and of how many batches
//!   were drawn: the resumed run makes a fresh one and replays that many `next_batch` calls, so
//!   no generator state is serialised;
//! - LoRA dropout draws its masks from seeds the run restarts from (seed, step) at the start of
//!   every step, so they depend on nothing else;
//! - the learning rate is a function of the step.
//!
//! **Crash safety.** The state is one file, replaced atomically
//! ([`transformer::tensor_file::write_atomically`]: temporary sibling, fsync, rename, fsync of
//! the directory): a crash at any point leaves the previous checkpoint whole and loadable. A
//! state with a non-finite weight or moment (an update that overflowed) is never written.
//!
//! **Damaged files.** [`load`] and [`Saved::restore`] never panic on what they read: a file
//! truncated or altered anywhere is an error naming it (the tensors go through
//! [`transformer::tensor_file::read_tensors_with`], which also refuses NaN and infinite values
//! except in `losses`, where NaN marks a step `--skip-nonfinite` skipped; the
//! state JSON is read only after its length is checked against the file's). Beyond the format,
//! they check what a run needs: `step`, `adam_step`, `batches_drawn` and `seed` present and in
//! range, one loss per step, each value and moment shaped as its parameter, m and v together,
//! and no negative second moment (AdamW divides by its square root).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use autograd::{AdamW, Trainable};
use serde_json::{Value, json};
use tensor::Tensor;
use tensor::ops::slice::write_axis;
use transformer::SaveDtype;
use transformer::tensor_file::{check_finite, read_tensors_with, write_tensors};

/// The checkpoint's file inside its directory.
pub const FILE: &str = "state.safetensors";

/// A tensor on the host: shape and values.
type HostTensor = (Vec<usize>, Vec<f32>);

/// Where a run stands, beside its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: u32,
    /// Batches drawn from the data order (steps × micro-batches per step).
    pub batches_drawn: u64,
    /// The run's seed: data order, LoRA's initialisation and its dropout.
    pub seed: u64,
    /// The options that define the run; a resumed run must be given the same ones.
    pub run: Value,
    /// Training loss of every step taken.
    pub losses: Vec<f32>,
}

impl Progress {
    /// A run about to take its first step.
    pub fn start(seed: u64, run: Value) -> Progress {
        Progress {
            step: 0,
            batches_drawn: 0,
            seed,
            run,
            losses: Vec::new(),
        }
    }
}

/// A checkpoint read from disk, not yet applied to a model.
pub struct Saved {
    pub progress: Progress,
    adam_step: u32,
    tensors: HashMap<String, HostTensor>,
    path: PathBuf,
}

/// Whether `dir` holds a checkpoint.
pub fn exists(dir: &Path) -> bool {
    dir.join(FILE).is_file()
}

/// Writes the run's state to `dir/state.safetensors` atomically, creating `dir` if needed.
pub fn save(
    dir: &Path,
    progress: &Progress,
    params: &[Trainable],
    opt: &AdamW,
) -> crate::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let host = |t: &Tensor| -> crate::Result<HostTensor> { Ok((t.shape().to_vec(), t.to_vec()?)) };
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    for p in params {
        tensors.push((format!("param/{}", p.name), host(&p.value)?));
    }
    for (p, m, v) in opt.state_tensors() {
        tensors.push((format!("adam_m/{}", p.name), host(m)?));
        tensors.push((format!("adam_v/{}", p.name), host(v)?));
    }
    // A checkpoint is only worth writing if it can be resumed: an update that overflowed
    // (a learning rate far too large) leaves non-finite weights although its loss and
    // gradient were finite. Refuse, and keep the previous checkpoint as it is.
    for (name, (_, data)) in &tensors {
        check_finite(name, data).map_err(|m| {
            format!(
                "step {}: after the update, {m}; the previous checkpoint in {} is kept as it \
                 was (a learning rate too large? try a lower --lr)",
                progress.step,
                dir.display()
            )
        })?;
    }
    let losses = (vec![progress.losses.len()], progress.losses.clone());
    tensors.push(("losses".to_string(), losses));
    let state = json!({
        "step": progress.step,
        "adam_step": opt.step,
        "batches_drawn": progress.batches_drawn,
        "seed": progress.seed,
        "run": progress.run,
    });
    let metadata = HashMap::from([("state".to_string(), state.to_string())]);
    let views = tensors
        .iter()
        .map(|(name, (shape, data))| (name.clone(), &shape[..], &data[..]));
    write_tensors(&dir.join(FILE), views, SaveDtype::F32, Some(metadata))?;
    Ok(())
}

/// Reads `dir/state.safetensors`.
pub fn load(dir: &Path) -> crate::Result<Saved> {
    let path = dir.join(FILE);
    let bad = |what: &str| format!("{}: not a fine-tuning checkpoint ({what})", path.display());
    let state = read_state(&path)?;
    let number = |key: &str| {
        state
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(&format!("no `{key}`, or not a non-negative integer")))
    };
    let (step, adam_step) = (number("step")?, number("adam_step")?);
    // `losses` holds NaN for the steps `--skip-nonfinite` skipped; every other tensor must be
    // finite.
    let mut tensors: HashMap<String, HostTensor> =
        read_tensors_with(&path, |_| true, |name| name == "losses")?
            .into_iter()
            .map(|(name, shape, data)| (name, (shape, data)))
            .collect();
    let (shape, losses) = tensors.remove("losses").ok_or_else(|| bad("no `losses`"))?;
    if shape.len() != 1 || losses.len() as u64 != step {
        return Err(bad(&format!(
            "`losses` is {shape:?}, but the state says {step} steps were taken: one loss a step"
        ))
        .into());
    }
    if let Some(i) = losses.iter().position(|l| l.is_infinite()) {
        return Err(bad(&format!(
            "`losses` holds {} at step {}: NaN marks a skipped step, but no loss is infinite",
            losses[i],
            i + 1
        ))
        .into());
    }
    let progress = Progress {
        step: u32::try_from(step).map_err(|_| bad("step out of range"))?,
        batches_drawn: number("batches_drawn")?,
        seed: number("seed")?,
        run: state.get("run").cloned().unwrap_or(Value::Null),
        losses,
    };
    Ok(Saved {
        progress,
        adam_step: u32::try_from(adam_step).map_err(|_| bad("adam_step out of range"))?,
        tensors,
        path,
    })
}

impl Saved {
    /// Writes the saved values into `params` (in place, so every holder of a parameter sees
    /// them) and the saved moments and step into `opt`; returns where the run stands. Errors if
    /// the file lacks one of `params` or holds a parameter that is not among them.
    pub fn restore(mut self, params: &[Trainable], opt: &mut AdamW) -> crate::Result<Progress> {
        let name = self.path.display().to_string();
        let mut moments = Vec::new();
        for p in params {
            let device = p.value.device();
            let (shape, values) = self
                .tensors
                .remove(&format!("param/{}", p.name))
                .ok_or_else(|| {
                    format!(
                        "{name}: no value for `{}`: was the run made with other options?",
                        p.name
                    )
                })?;
            if shape != p.value.shape() {
                let message = format!(
                    "{name}: `{}` is {shape:?} in the checkpoint but {:?} in the model",
                    p.name,
                    p.value.shape()
                );
                return Err(message.into());
            }
            write_axis(
                &p.value,
                0,
                0,
                &Tensor::from_vec(values, &shape, &device)?,
                false,
            )?;
            let m = self.tensors.remove(&format!("adam_m/{}", p.name));
            let v = self.tensors.remove(&format!("adam_v/{}", p.name));
            match (m, v) {
                (Some((sm, m)), Some((sv, v))) => {
                    if sm != shape || sv != shape {
                        let message = format!(
                            "{name}: AdamW moments of `{}` are {sm:?} (m) and {sv:?} (v), but the \
                             parameter is {shape:?}",
                            p.name
                        );
                        return Err(message.into());
                    }
                    if let Some(x) = v.iter().find(|x| **x < 0.0) {
                        let message = format!(
                            "{name}: `adam_v/{}` holds {x}; a second moment is never negative",
                            p.name
                        );
                        return Err(message.into());
                    }
                    let m = Tensor::from_vec(m, &sm, &device)?;
                    moments.push((p.id, m, Tensor::from_vec(v, &sv, &device)?));
                }
                (None, None) => {} // a parameter that has not taken a step yet
                (m, _) => {
                    let (has, lacks) = if m.is_some() { ("m", "v") } else { ("v", "m") };
                    let message = format!(
                        "{name}: `{}` has the AdamW moment {has} but not {lacks}",
                        p.name
                    );
                    return Err(message.into());
                }
            }
        }
        if let Some(extra) = self.tensors.keys().min() {
            let message = format!("{name}: `{extra}` belongs to no parameter this run trains");
            return Err(message.into());
        }
        opt.load_state(self.adam_step, moments)?;
        Ok(self.progress)
    }
}

/// The JSON state in a safetensors header's `__metadata__`: the header is the file's first
/// 8 bytes (its length, little-endian) then that many bytes of JSON.
fn read_state(path: &Path) -> crate::Result<Value> {
    let name = path.display();
    let bad = |what: String| format!("{name}: not a fine-tuning checkpoint ({what})");
    let mut file = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let file_len = file.metadata().map_err(|e| format!("{name}: {e}"))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(format!("{file_len} bytes, too short for a header: {e}")))?;
    let len = u64::from_le_bytes(len);
    // Checked before allocating: a flipped bit in these 8 bytes must not ask for exabytes.
    if len > file_len.saturating_sub(8) || len > 100 << 20 {
        return Err(bad(format!(
            "the header length says {len} bytes, but the file is {file_len} bytes"
        ))
        .into());
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("{name}: {e}"))?;
    let header: Value = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let state = header
        .get("__metadata__")
        .and_then(|m| m.get("state"))
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no saved state".to_string()))?;
    let state: Value = serde_json::from_str(state).map_err(|e| bad(format!("saved state: {e}")))?;
    if !state.is_object() {
        return Err(bad(format!("the saved state is {state}, not a JSON object")).into());
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use autograd::{Grads, Param, ParamGroup};
    use tensor::Device;

    /// Two steps of AdamW on w, from a fresh optimizer or from one restored between them.
    #[test]
    fn a_restored_optimizer_continues_bit_for_bit() {
        let cpu = Device::cpu();
        let grads_of = |p: &Trainable, g: &[f32]| {
            let mut grads = Grads::new();
            grads
                .accumulate(p.id, Tensor::from_vec(g.to_vec(), &[2], &cpu).unwrap())
                .unwrap();
            grads
        };
        let fresh = || {
            let w = Param::trainable("w", Tensor::from_vec(vec![1.0, -2.0], &[2], &cpu).unwrap());
            let w = w.as_trainable().unwrap().clone();
            (w.clone(), AdamW::new(vec![ParamGroup::new(vec![w], 0.01)]))
        };
        let (w, mut straight) = fresh();
        straight.step(&grads_of(&w, &[0.5, 0.25]), 0.1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let progress = Progress::start(7, json!({"lr": 0.1}));
        save(&dir, &progress, std::slice::from_ref(&w), &straight).unwrap();
        straight.step(&grads_of(&w, &[-1.0, 3.0]), 0.1).unwrap();

        let (w2, mut resumed) = fresh();
        let back = load(&dir)
            .unwrap()
            .restore(std::slice::from_ref(&w2), &mut resumed);
        assert_eq!(back.unwrap(), progress);
        assert_eq!(resumed.step, 1);
        resumed.step(&grads_of(&w2, &[-1.0, 3.0]), 0.1).unwrap();
        let bits = |t: &Tensor| {
            t.to_vec()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&w.value), bits(&w2.value));

        let (other, mut opt) = fresh();
        let renamed = Trainable {
            name: "u".into(),
            ..other
        };
        let e = load(&dir)
            .unwrap()
            .restore(&[renamed], &mut opt)
            .unwrap_err();
        assert!(e.to_string().contains("no value for `u`"), "{e}");
    }
}
