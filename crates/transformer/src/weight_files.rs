//! Where a model directory keeps its weights, in the order `transformers` looks for them:
//!
//! 1. `model.safetensors`: one file.
//! 2. `model.safetensors.index.json` + shards: `{"weight_map": {"transformer.wte.weight":
//!    "model-00001-of-00002.safetensors", ...}}`. Every shard is read; each tensor must be in the
//!    shard the index names, and every tensor the index names must be found.
//! 3. `pytorch_model.bin`: PyTorch's `torch.save` zip, read by [`crate::torch_pickle`], which
//!    rebuilds tensors and runs nothing.
//! 4. `pytorch_model.bin.index.json` + `.bin` shards, as 2.
//!
//! Another framework's weights (`tf_model.h5`, `flax_model.msgpack`) are refused by name.
//!
//! Safetensors files may hold bitsandbytes' 4-bit weights ([`crate::nf4_file`]): they are read
//! as [`Nf4Weight`]s beside the float tensors. A pickle with them is refused by its dtype.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tensor::quant::Nf4Weight;

use crate::error::{Error, Result};
use crate::nf4_file;
use crate::tensor_file::{self, NamedTensor, read_text};
use crate::torch_pickle;

/// The largest index file read (64 MiB; a 100-layer model's index is under 100 kB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// What a model directory's weight files hold.
pub struct Weights {
    /// The float tensors whose names passed the filter, read to f32.
    pub tensors: Vec<NamedTensor>,
    /// The NF4 weights, by their names in the file (empty for a float model).
    pub nf4: BTreeMap<String, Nf4Weight>,
    /// The path to name in later errors: the file, or the index for shards.
    pub path: PathBuf,
}

/// The tensors of `dir` whose names pass `keep`, and its NF4 weights.
pub fn read_weights(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Weights> {
    let plain = |(tensors, path)| Weights {
        tensors,
        nf4: BTreeMap::new(),
        path,
    };
    let single = dir.join("model.safetensors");
    if single.exists() {
        let (tensors, nf4) = tensor_file::read_tensors_and_nf4(&single, keep)?;
        return Ok(Weights {
            tensors,
            nf4,
            path: single,
        });
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let (tensors, nf4) = read_sharded(dir, &index, Format::Safetensors, keep)?;
        return Ok(Weights {
            tensors,
            nf4,
            path: index,
        });
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.exists() {
        return Ok(plain((torch_pickle::read_state_dict(&bin, keep)?, bin)));
    }
    let index = dir.join("pytorch_model.bin.index.json");
    if index.exists() {
        let (tensors, _) = read_sharded(dir, &index, Format::Torch, keep)?;
        return Ok(plain((tensors, index)));
    }
    let others = [
        ("tf_model.h5", "TensorFlow's format"),
        ("flax_model.msgpack", "Flax's format"),
    ];
    for (name, what) in others {
        let path = dir.join(name);
        if path.exists() {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "{what} is not read by this program, which reads safetensors and PyTorch's \
                     pytorch_model.bin: load the model in transformers with `from_tf`/`from_flax` \
                     and save it with `model.save_pretrained(dir)`"
                ),
            ));
        }
    }
    Err(Error::checkpoint(
        &single,
        "not found, nor model.safetensors.index.json, pytorch_model.bin or \
         pytorch_model.bin.index.json: the directory holds no model weights",
    ))
}

/// The file format of shards.
#[derive(Clone, Copy)]
enum Format {
    Safetensors,
    Torch,
}

/// The tensors (and, for safetensors, the NF4 weights) of every shard an index names.
fn read_sharded(
    dir: &Path,
    index: &Path,
    format: Format,
    keep: impl Fn(&str) -> bool,
) -> Result<(Vec<NamedTensor>, BTreeMap<String, Nf4Weight>)> {
    let suffix = match format {
        Format::Safetensors => ".safetensors",
        Format::Torch => ".bin",
    };
    let err = |m: String| Error::checkpoint(index, m);
    let text = read_text(index, MAX_INDEX_BYTES)?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let Some(map) = value.get("weight_map").and_then(Value::as_object) else {
        return Err(err(
            "expected an object `weight_map` {tensor: shard file}".into()
        ));
    };
    let mut by_shard: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(err(format!(
                "tensor `{tensor}`: expected a file name, found {file}"
            )));
        };
        // A shard is a file beside the index, never a path elsewhere.
        let plain = Path::new(file).file_name().is_some_and(|n| n == file)
            && !file.starts_with('.')
            && file.ends_with(suffix);
        if !plain {
            return Err(err(format!(
                "tensor `{tensor}`: shard `{file}` is not a {suffix} file name beside the index"
            )));
        }
        by_shard.entry(file).or_default().insert(tensor);
    }
    let mut out = Vec::new();
    let mut nf4 = BTreeMap::new();
    for (file, names) in by_shard {
        let path = dir.join(file);
        let wanted = |k: &str| names.contains(k) && keep(k);
        let (tensors, quantized) = match format {
            Format::Safetensors => tensor_file::read_tensors_and_nf4(&path, wanted)?,
            Format::Torch => (
                torch_pickle::read_state_dict(&path, wanted)?,
                BTreeMap::new(),
            ),
        };
        let found: BTreeSet<&str> = tensors.iter().map(|(n, _, _)| n.as_str()).collect();
        // A quantized weight's parts are read with it (a missing part is an error there).
        let accounted =
            |n: &str| found.contains(n) || quantized.contains_key(n) || nf4_file::is_quant_part(n);
        if let Some(lost) = names.iter().find(|n| keep(n) && !accounted(n)) {
            return Err(err(format!(
                "tensor `{lost}` is not in `{file}`, the shard the index names for it"
            )));
        }
        out.extend(tensors);
        nf4.extend(quantized);
    }
    Ok((out, nf4))
}
