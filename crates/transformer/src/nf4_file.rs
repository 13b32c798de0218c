//! bitsandbytes' 4-bit tensors in a safetensors file: how transformers saves a model loaded with
//! `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`.
//!
//! A quantized weight `NAME` (in GPT-2, `transformer.h.{i}.{attn.c_attn, attn.c_proj, mlp.c_fc,
//! mlp.c_proj}.weight`) is stored as several tensors:
//!
//! | key | dtype, shape | holds |
//! |---|---|---|
//! | `NAME` | U8 (ceil(n/2), 1) | the 4-bit codes, two per byte, high nibble first |
//! | `NAME.absmax` | F32 (blocks) or U8 (blocks) | block scales, or their 8-bit codes (double quantization) |
//! | `NAME.quant_map` | F32 (16) | the 4-bit levels: must be NF4's |
//! | `NAME.nested_absmax` | F32 (blocks / 256, rounded up) | double quantization: scales of the scales |
//! | `NAME.nested_quant_map` | F32 (256) | double quantization: the 8-bit map |
//! | `NAME.quant_state.bitsandbytes__nf4` | U8 (JSON bytes) | `quant_type`, `blocksize`, `dtype`, `shape`, and with double quantization `nested_blocksize`, `nested_dtype`, `nested_offset` |
//!
//! The quantized matrix is the `nn.Linear` orientation, (out, in): for GPT-2's Conv1D layers,
//! transformers transposes W (in, out) before quantizing. Everything else in the file (embeddings,
//! layer norms, biases) is an ordinary float tensor.
//!
//! Only what this program computes exactly is read: `quant_type` "nf4" with the NF4 levels, and
//! `dtype` "float32" (a half-precision model dequantizes to that dtype, which this program does
//! not round to). Anything else is refused, naming the tensor and what was found.

use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};
use tensor::quant::{Blockwise8, NF4_LEVELS, Nf4Weight, Scales};

/// The suffix of the key holding a quantized weight's JSON state.
pub const QUANT_STATE: &str = ".quant_state.bitsandbytes__nf4";

/// Every NF4 weight of a safetensors file, by its name (e.g. `transformer.h.0.attn.c_attn.weight`),
/// in the stored (out, in) orientation. Err is a message naming the tensor.
pub fn read_nf4_weights(file: &SafeTensors<'_>) -> Result<BTreeMap<String, Nf4Weight>, String> {
    let mut weights = BTreeMap::new();
    for key in file.names() {
        if let Some(name) = key.strip_suffix(QUANT_STATE) {
            weights.insert(name.to_string(), read_one(file, name)?);
        }
        if key.ends_with(".quant_state.bitsandbytes__fp4") {
            return Err(format!(
                "`{key}`: an FP4-quantized weight; only NF4 is supported"
            ));
        }
    }
    Ok(weights)
}

/// Whether `key` is one of the tensors of a quantized weight other than its codes.
pub fn is_quant_part(key: &str) -> bool {
    [
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        QUANT_STATE,
    ]
    .iter()
    .any(|s| key.ends_with(s))
}

fn read_one(file: &SafeTensors<'_>, name: &str) -> Result<Nf4Weight, String> {
    let state_key = format!("{name}{QUANT_STATE}");
    let state: Value = serde_json::from_slice(bytes(file, &state_key, Dtype::U8)?)
        .map_err(|e| format!("`{state_key}`: not JSON: {e}"))?;
    let field = |k: &str| {
        state
            .get(k)
            .ok_or_else(|| format!("`{state_key}`: no `{k}`"))
    };
    let text = |k: &str| -> Result<String, String> {
        field(k)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("`{state_key}`: `{k}` is not a string"))
    };
    let uint = |k: &str| -> Result<usize, String> {
        field(k)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("`{state_key}`: `{k}` is not a non-negative integer"))
    };
    let quant_type = text("quant_type")?;
    if quant_type != "nf4" {
        return Err(format!(
            "`{name}`: quant_type `{quant_type}`; only `nf4` is supported"
        ));
    }
    let dtype = text("dtype")?;
    if dtype != "float32" {
        return Err(format!(
            "`{name}`: dtype `{dtype}`: the model was quantized from {dtype} weights, which \
             bitsandbytes dequantizes to {dtype}; only float32 models are read exactly"
        ));
    }
    let blocksize = uint("blocksize")?;
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .and_then(|a| a.iter().map(|v| v.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| format!("`{state_key}`: `shape` is not a list of sizes"))?;
    let levels = f32s(file, &format!("{name}.quant_map"))?;
    if levels
        .iter()
        .map(|v| v.to_bits())
        .ne(NF4_LEVELS.iter().map(|v| v.to_bits()))
    {
        return Err(format!("`{name}.quant_map`: not the 16 NF4 levels"));
    }
    let absmax_key = format!("{name}.absmax");
    let scales = if state.get("nested_offset").is_some() {
        let offset = field("nested_offset")?
            .as_f64()
            .ok_or_else(|| format!("`{state_key}`: `nested_offset` is not a number"))?;
        let nested_blocksize = uint("nested_blocksize")?;
        let nested_dtype = text("nested_dtype")?;
        if nested_dtype != "float32" {
            return Err(format!(
                "`{name}`: nested_dtype `{nested_dtype}`; expected float32"
            ));
        }
        let map: [f32; 256] = f32s(file, &format!("{name}.nested_quant_map"))?
            .try_into()
            .map_err(|v: Vec<f32>| {
                format!(
                    "`{name}.nested_quant_map`: {} values; expected 256",
                    v.len()
                )
            })?;
        Scales::Double {
            nested: Box::new(Blockwise8 {
                codes: bytes(file, &absmax_key, Dtype::U8)?.to_vec(),
                absmax: f32s(file, &format!("{name}.nested_absmax"))?,
                map,
                blocksize: nested_blocksize,
            }),
            offset: offset as f32,
        }
    } else {
        Scales::F32(f32s(file, &absmax_key)?)
    };
    let codes = bytes(file, name, Dtype::U8)?;
    Nf4Weight::from_parts(&shape, blocksize, codes, scales).map_err(|e| format!("`{name}`: {e}"))
}

/// The raw bytes of tensor `key`, which must have `dtype`.
fn bytes<'a>(file: &'a SafeTensors<'_>, key: &str, dtype: Dtype) -> Result<&'a [u8], String> {
    let view = file.tensor(key).map_err(|_| format!("no tensor `{key}`"))?;
    if view.dtype() != dtype {
        return Err(format!(
            "`{key}`: dtype {:?}; expected {dtype:?}",
            view.dtype()
        ));
    }
    Ok(view.data())
}

fn f32s(file: &SafeTensors<'_>, key: &str) -> Result<Vec<f32>, String> {
    Ok(bytemuck::pod_collect_to_vec(bytes(file, key, Dtype::F32)?))
}

/// The tensors that store `w` under `name`, as transformers writes them: (key, dtype, shape,
/// little-endian bytes).
pub fn nf4_tensors(name: &str, w: &Nf4Weight) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut state = json!({
        "quant_type": "nf4",
        "blocksize": w.blocksize(),
        "dtype": "float32",
        "shape": w.shape(),
    });
    let codes = w.bytes().to_vec();
    let mut out = vec![
        (name.to_string(), Dtype::U8, vec![codes.len(), 1], codes),
        (
            format!("{name}.quant_map"),
            Dtype::F32,
            vec![16],
            f32_bytes(&NF4_LEVELS),
        ),
    ];
    match w.scales() {
        Scales::F32(absmax) => {
            out.push((
                format!("{name}.absmax"),
                Dtype::F32,
                vec![absmax.len()],
                f32_bytes(absmax),
            ));
        }
        Scales::Double { nested, offset } => {
            state["nested_blocksize"] = json!(nested.blocksize);
            state["nested_dtype"] = json!("float32");
            state["nested_offset"] = json!(*offset as f64);
            out.push((
                format!("{name}.absmax"),
                Dtype::U8,
                vec![nested.codes.len()],
                nested.codes.clone(),
            ));
            out.push((
                format!("{name}.nested_absmax"),
                Dtype::F32,
                vec![nested.absmax.len()],
                f32_bytes(&nested.absmax),
            ));
            out.push((
                format!("{name}.nested_quant_map"),
                Dtype::F32,
                vec![256],
                f32_bytes(&nested.map),
            ));
        }
    }
    let state = serde_json::to_vec(&state).expect("a JSON value serialises");
    out.push((
        format!("{name}{QUANT_STATE}"),
        Dtype::U8,
        vec![state.len()],
        state,
    ));
    out
}

/// The `quantization_config` transformers writes into `config.json` for
/// `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
/// bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)`: what makes
/// `from_pretrained` rebuild the 4-bit layers from the tensors above.
pub fn quantization_config(double_quant: bool) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// What a `config.json`'s `quantization_config` asks for: `Ok(false)` without one (a float
/// model), `Ok(true)` for bitsandbytes' 4-bit NF4. Any other method (8-bit LLM.int8, FP4, GPTQ,
/// AWQ, ...) is an error naming it: its weights are not stored as this program reads them.
pub fn wants_nf4(config: &Value) -> Result<bool, String> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(false);
    };
    if q.is_null() {
        return Ok(false);
    }
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "bitsandbytes" {
        return Err(format!(
            "`quantization_config`: quant_method `{method}`; only bitsandbytes' 4-bit NF4 is \
             supported"
        ));
    }
    let flag = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("load_in_8bit") || flag("_load_in_8bit") {
        return Err(
            "`quantization_config`: load_in_8bit (LLM.int8); only bitsandbytes' 4-bit NF4 is \
             supported"
                .into(),
        );
    }
    if !(flag("load_in_4bit") || flag("_load_in_4bit")) {
        return Err("`quantization_config`: bitsandbytes without load_in_4bit".into());
    }
    let kind = q
        .get("bnb_4bit_quant_type")
        .and_then(Value::as_str)
        .unwrap_or("fp4"); // transformers' default
    if kind != "nf4" {
        return Err(format!(
            "`quantization_config`: bnb_4bit_quant_type `{kind}`; only `nf4` is supported"
        ));
    }
    Ok(true)
}
