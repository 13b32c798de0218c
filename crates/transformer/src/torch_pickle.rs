//! PyTorch's `torch.save` format, read without running any of it: a state dict (`{name:
//! tensor}`) from `pytorch_model.bin` (and, the same format, PEFT's `adapter_model.bin`).
//!
//! The file is a zip archive (stored, not compressed) of one folder `<root>/`:
//! `<root>/data.pkl`, a Python pickle of the dict, and `<root>/data/<key>`, the raw
//! little-endian bytes of each storage. The pickle is a small stack program; Python's
//! `pickle.load` would import and call whatever it names, which is how a `.bin` file can run
//! code. This reader is a pickle machine that knows only the opcodes a state dict uses and only
//! these callables, each rebuilt by hand rather than called:
//!
//! | global | what we build |
//! |---|---|
//! | `collections.OrderedDict` | an empty dict |
//! | `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` | a tensor view of a storage |
//! | `torch._utils._rebuild_parameter(tensor, ...)` | the tensor |
//! | `torch.FloatStorage`, `HalfStorage`, `BFloat16Storage` | the storage's dtype (f32, f16, bf16) |
//!
//! A storage is a persistent id `('storage', <dtype global>, key, location, numel)`. Any other
//! global, opcode or shape of data is refused by name: the error says which, and that this reader
//! only rebuilds tensors. Values are read to f32 (f16 and bf16 exactly), strides honoured, every
//! index bounds-checked against its storage, and non-finite values refused as in
//! [`crate::tensor_file`].

//!
//! This file is the archive side (the zip, the storages, the strided gather);
//! `torch_pickle/vm.rs` is the pickle machine.

mod vm;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::tensor_file::{NamedTensor, check_finite};
use vm::{Machine, Obj, kind};

/// The largest `data.pkl` read (256 MiB; GPT-2 XL's is under 100 kB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// The dtypes a storage may hold.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
}

/// A tensor as the pickle describes it: a strided view of a storage.
#[derive(Clone, Debug)]
struct TensorRef {
    key: String,
    dtype: Dtype,
    numel: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Reads the state dict of a `torch.save` file: the tensors whose names pass `keep`, as f32.
pub fn read_state_dict(path: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<NamedTensor>> {
    let err = |m: String| Error::checkpoint(path, m);
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        err(format!(
            "not a zip archive ({e}): only PyTorch's zip format (torch.save since 1.6) is read, \
             not the legacy tar/pickle one"
        ))
    })?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| err("no `<root>/data.pkl` in the archive: not a torch.save file".into()))?;
    let root = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Some(order) = read_entry(&mut zip, &format!("{root}byteorder"), 16, file_len, path)?
        && order != b"little"
    {
        return Err(err(format!(
            "byteorder is {:?}; only little-endian storages are read",
            String::from_utf8_lossy(&order)
        )));
    }
    let pickle = read_entry(&mut zip, &pkl_name, MAX_PICKLE_BYTES, file_len, path)?
        .ok_or_else(|| err(format!("`{pkl_name}` cannot be read")))?;
    let top = Machine::default()
        .run(&pickle)
        .map_err(|m| err(format!("{pkl_name}: {m}")))?;
    let Obj::Dict(items) = top else {
        return Err(err(format!(
            "{pkl_name}: expected a state dict {{name: tensor}}, found {}",
            kind(&top)
        )));
    };
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::new();
    for (name, value) in items.borrow().iter() {
        let Obj::Str(name) = name else {
            return Err(err(format!(
                "a state-dict key is {}, not a name",
                kind(name)
            )));
        };
        let Obj::Tensor(t) = value else {
            return Err(err(format!(
                "`{name}` is {}, not a tensor: this reader only rebuilds tensors",
                kind(value)
            )));
        };
        if !keep(name) {
            continue;
        }
        if !storages.contains_key(&t.key) {
            let entry = format!("{root}data/{}", t.key);
            let bytes = read_entry(&mut zip, &entry, file_len, file_len, path)?
                .ok_or_else(|| err(format!("`{name}`: storage `{entry}` is not in the archive")))?;
            storages.insert(t.key.clone(), bytes);
        }
        let data = gather(t, &storages[&t.key]).map_err(|m| err(format!("`{name}`: {m}")))?;
        check_finite(name, &data).map_err(err)?;
        out.push((name.clone(), t.shape.clone(), data));
    }
    Ok(out)
}

/// The bytes of one archive entry of at most `max` bytes, `None` if there is no such entry.
fn read_entry(
    zip: &mut zip::ZipArchive<File>,
    name: &str,
    max: u64,
    file_len: u64,
    path: &Path,
) -> Result<Option<Vec<u8>>> {
    let mut entry = match zip.by_name(name) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(Error::checkpoint(path, format!("`{name}`: {e}"))),
    };
    if entry.size() > max.min(file_len) {
        return Err(Error::checkpoint(
            path,
            format!(
                "`{name}` claims {} bytes, more than this reader accepts",
                entry.size()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| Error::checkpoint(path, format!("`{name}`: {e}")))?;
    Ok(Some(bytes))
}

/// The tensor's values, row-major, from its storage's bytes.
fn gather(t: &TensorRef, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let size = t.dtype.size();
    if bytes.len() < t.numel * size {
        return Err(format!(
            "storage `{}` holds {} bytes, fewer than its {} {:?} values",
            t.key,
            bytes.len(),
            t.numel,
            t.dtype
        ));
    }
    let n: usize = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    // The largest index the view touches must be inside the storage.
    let mut last = t.offset;
    for (&d, &s) in t.shape.iter().zip(&t.stride) {
        if d > 0 {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or("strides overflow")?;
        }
    }
    if n > 0 && last >= t.numel {
        return Err(format!(
            "shape {:?}, stride {:?} at offset {} reach element {last} of a storage of {}",
            t.shape, t.stride, t.offset, t.numel
        ));
    }
    let value = |i: usize| -> f32 {
        let b = &bytes[i * size..(i + 1) * size];
        match t.dtype {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        }
    };
    let mut out = Vec::with_capacity(n);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..n {
        let at = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.push(value(at));
        for axis in (0..index.len()).rev() {
            index[axis] += 1;
            if index[axis] < t.shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> std::result::Result<Obj, String> {
        Machine::default().run(bytes)
    }

    #[test]
    fn a_state_dict_of_one_tensor_is_rebuilt() {
        // {"w": _rebuild_tensor_v2(storage('0', Float, 6), 1, (2, 2), (1, 2), False, OrderedDict())}
        let pickle = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00w\
ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storagectorch\nFloatStorage\n\
X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQK\x01K\x02K\x02\x86K\x01K\x02\x86\x89h\x00)Rtq\x03Rq\x04u.";
        let Obj::Dict(d) = run(pickle).unwrap() else {
            panic!()
        };
        let d = d.borrow();
        let Obj::Tensor(t) = &d[0].1 else { panic!() };
        assert_eq!(
            (t.offset, &t.shape[..], &t.stride[..]),
            (1, &[2, 2][..], &[1, 2][..])
        );
        let bytes: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        // Element (r, c) is storage[1 + r + 2c]: a transposed view.
        assert_eq!(gather(t, &bytes).unwrap(), [1.0, 3.0, 2.0, 4.0]);
        let short = TensorRef {
            offset: 3,
            ..(**t).clone()
        };
        assert!(
            gather(&short, &bytes)
                .unwrap_err()
                .contains("reach element 6")
        );
    }
}
