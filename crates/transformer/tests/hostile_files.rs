//! Hostile model directories: every way a file can be damaged or forged is an error that names
//! the file, never a panic, an abort or an allocation the file's size does not justify.
//!
//! The cases, one test each: a safetensors file truncated at every offset, a byte flipped
//! anywhere, a header length larger than the file or than any memory, overlapping and
//! out-of-range data offsets, dtypes we do not read, shapes that disagree with `config.json`,
//! NaN and infinite weights, a `config.json` that is not an object, lacks a field, or declares
//! sizes that would overflow or exhaust memory, and broken tokenizer files. Then two mutation
//! fuzzers (proptest) start from valid files and apply random damage: byte flips, truncation,
//! insertion, deletion, a forged header length, and edits inside the JSON (dtype strings,
//! offsets, shapes, config values). Their case count is `PROPTEST_CASES` (default 256 each);
//! every case must load or fail with a message naming a file of the directory, and its largest
//! single allocation must stay under [`ALLOCATION_BOUND`].
//!
//! `cargo test -p transformer --test hostile_files`

use std::path::Path;

use integration_tests::hostile::{
    JsonEdit, Mutation, Watch, apply, edit_json, fuzz, join, json_edit, mutation, split, watched,
};
use integration_tests::{Scratch, scratch};
use proptest::prelude::*;
use serde_json::{Value, json};
use transformer::{Checkpoint, GptConfig, NamedTensor, SaveDtype, Tokenizer};

#[global_allocator]
static WATCH: Watch = Watch;

/// The largest single allocation a load of one of these small (< 8 kB) directories may make:
/// the size table of a config at [`GptConfig::MAX_LAYERS`] is the largest legitimate one
/// (49,156 names and shapes, about 2.4 MB).
const ALLOCATION_BOUND: usize = 8 << 20;

// ---------------------------------------------------------------------------------------------
// Small valid files.

/// L=1, C=2, V=256, n_positions=4: 604 parameters, a `model.safetensors` of about 4 kB.
fn tiny_config() -> GptConfig {
    GptConfig::from_json_str(
        r#"{"n_layer": 1, "n_head": 1, "n_embd": 2, "vocab_size": 256, "n_positions": 4}"#,
    )
    .unwrap()
}

/// The tiny model with deterministic finite values.
fn tiny_checkpoint() -> Checkpoint {
    let config = tiny_config();
    let mut k = 0u32;
    let tensors: Vec<NamedTensor> = transformer::parameter_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|_| {
                    k += 1;
                    (k * 37 % 101) as f32 / 50.0 - 1.0
                })
                .collect();
            (name, shape, data)
        })
        .collect();
    Checkpoint::new(config, tensors)
}

/// A directory holding the tiny model; returns it and the bytes of its `model.safetensors`.
fn tiny_model_dir(tag: &str) -> (Scratch, Vec<u8>) {
    let dir = scratch(&format!("transformer-hostile-{tag}"));
    tiny_checkpoint().save(&dir).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    (dir, bytes)
}

/// The error of loading `dir`, which must start with the path of one of `dir`'s files.
fn load_error(dir: &Path) -> String {
    match Checkpoint::load(dir) {
        Ok(_) => panic!("{} loaded, but should not", dir.display()),
        Err(e) => {
            let e = e.to_string();
            assert_names_a_file_of(dir, &e);
            e
        }
    }
}

fn assert_names_a_file_of(dir: &Path, e: &str) {
    let dir = dir.display().to_string();
    assert!(e.starts_with(&dir), "the error does not name the file: {e}");
}

// ---------------------------------------------------------------------------------------------
// model.safetensors

/// A small safetensors file of every dtype we read and one we skip: F32 [2, 3], F16 [4],
/// BF16 [3], and a U8 [2] that `read_tensors_where` filters out (as the loader does with the
/// causal-mask buffers). About 280 bytes. The last F32 is 2^126 (bits 0x7E80_0000), one bit
/// away from infinity, so that a flipped byte can make a value non-finite.
fn small_mixed_file(path: &Path) -> Vec<u8> {
    use safetensors::{Dtype, tensor::TensorView};
    let f32s: Vec<u8> = [0.5f32, -1.0, 2.0, 0.25, 3.0, f32::from_bits(0x7E80_0000)]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let f16s: Vec<u8> = [1.0f32, 2.0, -3.0, 0.125]
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = [7.0f32, -8.0, 0.0]
        .iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect();
    let mask = [1u8, 0];
    let views = [
        ("a", TensorView::new(Dtype::F32, vec![2, 3], &f32s).unwrap()),
        ("b", TensorView::new(Dtype::F16, vec![4], &f16s).unwrap()),
        ("c", TensorView::new(Dtype::BF16, vec![3], &bf16s).unwrap()),
        ("mask", TensorView::new(Dtype::U8, vec![2], &mask).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
    std::fs::read(path).unwrap()
}

fn read_small(path: &Path) -> transformer::Result<Vec<NamedTensor>> {
    transformer::tensor_file::read_tensors_where(path, |name| name != "mask")
}

#[test]
fn truncated_at_every_offset_is_an_error_naming_the_file() {
    let dir = scratch("transformer-hostile-truncated");
    let path = dir.join("small.safetensors");
    let bytes = small_mixed_file(&path);
    assert_eq!(read_small(&path).unwrap().len(), 3);
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let (result, largest) = watched(|| read_small(&path));
        let e = result.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: not a", path.display())),
            "cut at {len}: {e}"
        );
        assert!(largest <= ALLOCATION_BOUND, "cut at {len}: {largest} bytes");
    }
    // The messages say what is wrong: too short for the length, or a length past the end.
    std::fs::write(&path, &bytes[..5]).unwrap();
    let e = read_small(&path).unwrap_err().to_string();
    assert!(
        e.contains("5 bytes, too short for the 8-byte header length"),
        "{e}"
    );
    std::fs::write(&path, &bytes[..100]).unwrap();
    let e = read_small(&path).unwrap_err().to_string();
    assert!(e.contains("but only 92 follow it"), "{e}");

    // A whole model directory (the same reader, behind `Checkpoint::load`): the first 16 cuts,
    // then every 13th.
    let (dir2, model) = tiny_model_dir("truncated-model");
    let cuts: Vec<usize> = (0..16).chain((16..model.len()).step_by(13)).collect();
    for &len in &cuts {
        std::fs::write(dir2.join("model.safetensors"), &model[..len]).unwrap();
        let (e, largest) = watched(|| load_error(&dir2));
        assert!(e.contains("model.safetensors: not a"), "cut at {len}: {e}");
        assert!(largest <= ALLOCATION_BOUND, "cut at {len}: {largest} bytes");
    }
    println!(
        "{} cuts of a {}-byte file, {} of a {}-byte model",
        bytes.len(),
        bytes.len(),
        cuts.len(),
        model.len()
    );
}

#[test]
fn a_flipped_byte_anywhere_loads_or_fails_naming_the_file() {
    let dir = scratch("transformer-hostile-flipped");
    let path = dir.join("small.safetensors");
    let bytes = small_mixed_file(&path);
    let (mut loaded, mut refused) = (0, 0);
    for at in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut damaged = bytes.clone();
            damaged[at] ^= mask;
            std::fs::write(&path, &damaged).unwrap();
            let (result, largest) = watched(|| read_small(&path));
            assert!(largest <= ALLOCATION_BOUND, "flip {mask:#x} at {at}");
            match result {
                Ok(tensors) => {
                    // Only a value can change unnoticed, never the length or the layout, and
                    // no value read is NaN or infinite.
                    assert!(at >= 8, "flip {mask:#x} of the header length loaded");
                    let finite = tensors.iter().all(|t| t.2.iter().all(|x| x.is_finite()));
                    assert!(finite, "flip {mask:#x} at {at} loaded a non-finite value");
                    loaded += 1;
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.starts_with(&path.display().to_string()), "{e}");
                    refused += 1;
                }
            }
        }
    }
    // Every flip of the 8 length bytes is refused; so is any flip that makes a value NaN/inf.
    assert!(refused >= 24 && loaded > 0);
    println!(
        "{} flips: {loaded} loaded (a value or the skipped mask changed), {refused} refused",
        3 * bytes.len()
    );

    // A whole model directory: one flip every 5 bytes of the header, masks in turn.
    let (dir2, model) = tiny_model_dir("flipped-model");
    let data_start = model.len() - split(&model).1.len();
    for at in (0..data_start).step_by(5) {
        let mut damaged = model.clone();
        damaged[at] ^= [0x01u8, 0x80, 0xFF][at % 3];
        std::fs::write(dir2.join("model.safetensors"), &damaged).unwrap();
        let (result, largest) = watched(|| Checkpoint::load(&dir2));
        assert!(largest <= ALLOCATION_BOUND, "flip at {at}");
        if let Err(e) = result {
            assert_names_a_file_of(&dir2, &e.to_string());
        }
    }
}

#[test]
fn header_length_beyond_the_file_or_memory_is_refused_before_allocating() {
    let (dir, bytes) = tiny_model_dir("header-len");
    let path = dir.join("model.safetensors");
    let file_len = bytes.len() as u64;
    for forged in [file_len - 7, file_len, 1 << 40, u64::MAX] {
        let mut damaged = bytes.clone();
        damaged[..8].copy_from_slice(&forged.to_le_bytes());
        std::fs::write(&path, &damaged).unwrap();
        let (e, largest) = watched(|| load_error(&dir));
        let want = format!(
            "the header length says {forged} bytes, but only {} follow it (the file is \
             {file_len} bytes",
            file_len - 8
        );
        assert!(e.contains(&want), "{e}");
        assert!(
            largest < 1 << 20,
            "{largest} bytes allocated for a forged length"
        );
    }
}

/// Rewrites the header of the tiny model with `edit`, keeping the data, and loads it.
fn edited_header_error(tag: &str, edit: impl FnOnce(&mut Value)) -> String {
    let (dir, bytes) = tiny_model_dir(tag);
    let (mut header, data) = split(&bytes);
    edit(&mut header);
    std::fs::write(dir.join("model.safetensors"), join(&header, &data)).unwrap();
    load_error(&dir)
}

#[test]
fn overlapping_and_out_of_range_offsets_are_refused() {
    let name = "transformer.h.0.ln_1.bias";
    // Overlap: the tensor starts 4 bytes before its predecessor ends.
    let e = edited_header_error("overlap", |h| {
        let [a, b] =
            [&h[name]["data_offsets"][0], &h[name]["data_offsets"][1]].map(|v| v.as_u64().unwrap());
        h[name]["data_offsets"] = json!([a - 4, b - 4]);
    });
    assert!(
        e.contains(&format!("invalid offset for tensor `{name}`")),
        "{e}"
    );
    // Out of range: the last tensor ends past the end of the file.
    let e = edited_header_error("out-of-range", |h| {
        let last = h
            .as_object()
            .unwrap()
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.get("data_offsets")?[1].as_u64()?)))
            .max_by_key(|(_, end)| *end)
            .unwrap();
        let start = h[&last.0]["data_offsets"][0].clone();
        h[&last.0]["data_offsets"] = json!([start, last.1 + (1 << 40)]);
    });
    assert!(e.contains("not a readable safetensors file"), "{e}");
    // An end before the start.
    let e = edited_header_error("reversed", |h| {
        let [a, _] =
            [&h[name]["data_offsets"][0], &h[name]["data_offsets"][1]].map(|v| v.as_u64().unwrap());
        h[name]["data_offsets"] = json!([a, 0]);
    });
    assert!(
        e.contains(&format!("invalid offset for tensor `{name}`")),
        "{e}"
    );
}

#[test]
fn dtypes_we_do_not_read_are_named_with_the_tensor() {
    // I32 is covered in tests/checkpoint.rs; here F64 (the same bytes as two F32s) and names
    // the safetensors crate does not know.
    let name = "transformer.ln_f.weight";
    let e = edited_header_error("f64", |h| {
        h[name]["dtype"] = json!("F64");
        h[name]["shape"] = json!([1]);
    });
    assert!(
        e.contains(&format!(
            "tensor `{name}`: expected dtype F32, F16 or BF16, found F64"
        )),
        "{e}"
    );
    let e = edited_header_error("q4", |h| h[name]["dtype"] = json!("Q4_K"));
    assert!(e.contains("invalid JSON in header"), "{e}");
}

#[test]
fn shapes_that_disagree_with_the_config_or_the_data_are_refused() {
    // The data's size: shape [3] for the 8 bytes of a [2] tensor.
    let name = "transformer.ln_f.weight";
    let e = edited_header_error("shape-data", |h| h[name]["shape"] = json!([3]));
    assert!(e.contains("invalid shape, data type, or offset"), "{e}");
    // A shape whose element count overflows usize.
    let e = edited_header_error("shape-overflow", |h| {
        h[name]["shape"] = json!([u64::MAX, u64::MAX, 2])
    });
    assert!(e.contains("overflow computing buffer size"), "{e}");
    // The config: the same file under a config that says n_positions = 2.
    let (dir, _) = tiny_model_dir("shape-config");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["n_positions"] = json!(2);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `wpe.weight`: expected shape [2, 2], found [4, 2]"),
        "{e}"
    );
}

#[test]
fn nan_and_infinite_weights_are_errors_naming_tensor_and_count() {
    for dtype in [SaveDtype::F32, SaveDtype::F16, SaveDtype::BF16] {
        let dir = scratch(&format!("transformer-hostile-nan-{dtype:?}"));
        let mut ckpt = tiny_checkpoint();
        let (_, _, fc) = ckpt
            .tensors
            .iter_mut()
            .find(|(n, _, _)| n == "h.0.mlp.c_fc.weight")
            .unwrap();
        fc[5] = f32::NAN;
        fc[6] = f32::INFINITY;
        fc[9] = f32::NEG_INFINITY;
        ckpt.save_as(&dir, dtype).unwrap();
        let e = load_error(&dir);
        assert!(
            e.contains(
                "tensor `transformer.h.0.mlp.c_fc.weight`: 3 of its 16 values are not finite \
                 (NaN or infinite; the first, at index 5, is NaN)"
            ),
            "{dtype:?}: {e}"
        );
    }
}

#[test]
fn an_empty_or_missing_model_file_is_named() {
    let (dir, _) = tiny_model_dir("empty");
    let path = dir.join("model.safetensors");
    std::fs::write(&path, b"").unwrap();
    assert!(load_error(&dir).contains("0 bytes, too short"));
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap(); // a directory where the file should be
    load_error(&dir);
}

// ---------------------------------------------------------------------------------------------
// config.json

#[test]
fn config_that_is_not_an_object_or_lacks_a_field_names_the_file() {
    let (dir, _) = tiny_model_dir("config-shape");
    let path = dir.join("config.json");
    let cases = [
        ("[1, 2]", "expected a JSON object"),
        ("\"gpt2\"", "expected a JSON object"),
        ("null", "expected a JSON object"),
        ("{}", "field `n_embd` is missing"),
        (
            r#"{"n_embd": 2, "vocab_size": 256}"#,
            "field `n_layer` is missing",
        ),
        ("{\"n_embd\": 2", "not valid JSON"),
        ("", "not valid JSON"),
    ];
    for (text, want) in cases {
        std::fs::write(&path, text).unwrap();
        let e = load_error(&dir);
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(e.contains(want), "{text}: {e}");
    }
    std::fs::write(&path, [b'{', 0xFF, b'}']).unwrap();
    assert!(load_error(&dir).contains("not UTF-8 text (invalid byte at offset 1)"));
}

#[test]
fn sizes_that_would_overflow_or_exhaust_memory_are_refused() {
    let base = json!({"n_layer": 1, "n_head": 1, "n_embd": 2, "vocab_size": 256, "n_positions": 4});
    let cases = [
        (
            "n_embd",
            json!(1u64 << 62),
            "`n_embd` must be at most 16777216",
        ),
        (
            "n_embd",
            json!(u64::MAX),
            "`n_embd` must be at most 16777216",
        ),
        (
            "n_layer",
            json!(1u64 << 50),
            "`n_layer` must be at most 4096",
        ),
        (
            "vocab_size",
            json!(1u64 << 40),
            "`vocab_size` must be at most",
        ),
        (
            "n_positions",
            json!(1u64 << 33),
            "`n_positions` must be at most",
        ),
        ("n_head", json!(1u64 << 30), "`n_head` must be at most"),
        ("n_embd", json!(1 << 20), "parameters (L=1 C=1048576"),
    ];
    for (key, value, want) in cases {
        let mut config = base.clone();
        config[key] = value;
        let (result, largest) = watched(|| GptConfig::from_json_str(&config.to_string()));
        let e = result.unwrap_err().to_string();
        assert!(e.contains(want), "{key}: {e}");
        assert!(largest < 1 << 20, "{key}: {largest} bytes allocated");
    }
    // The largest legitimate size table still loads quickly and within the bound.
    let mut config = base.clone();
    config["n_layer"] = json!(GptConfig::MAX_LAYERS);
    let config = GptConfig::from_json_str(&config.to_string()).unwrap();
    let (table, largest) = watched(|| transformer::parameter_shapes(&config).len());
    assert_eq!(table, 12 * GptConfig::MAX_LAYERS + 4);
    assert!(largest <= ALLOCATION_BOUND, "{largest}");
}

#[test]
fn a_config_larger_than_the_bound_is_not_read_whole() {
    let (dir, _) = tiny_model_dir("config-huge");
    let path = dir.join("config.json");
    let mut text = vec![b' '; transformer::config::MAX_CONFIG_BYTES as usize];
    text.extend_from_slice(br#"{"n_layer": 1}"#);
    std::fs::write(&path, text).unwrap();
    let (e, largest) = watched(|| load_error(&dir));
    assert!(e.contains("larger than 16777216 bytes"), "{e}");
    assert!(largest <= 2 * transformer::config::MAX_CONFIG_BYTES as usize + 64);
}

// ---------------------------------------------------------------------------------------------
// vocab.json + merges.txt

/// The 256 byte symbols (ids in byte order), `Ġt` = 256, `he` = 257, `<|endoftext|>` = 258.
fn tiny_tokenizer_files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let mut vocab: serde_json::Map<String, Value> = transformer::bytes_to_unicode()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    for (i, s) in ["Ġt", "he", "<|endoftext|>"].iter().enumerate() {
        vocab.insert(s.to_string(), json!(256 + i));
    }
    let vocab = Value::Object(vocab).to_string().into_bytes();
    let merges = "#version: 0.2\nĠ t\nh e\n".as_bytes().to_vec();
    std::fs::write(dir.join("vocab.json"), &vocab).unwrap();
    std::fs::write(dir.join("merges.txt"), &merges).unwrap();
    (vocab, merges)
}

fn tokenizer_config() -> GptConfig {
    GptConfig {
        vocab_size: 259,
        ..tiny_config()
    }
}

#[test]
fn tokenizer_files_truncated_anywhere_fail_naming_the_file() {
    let dir = scratch("transformer-hostile-tokenizer-cut");
    let (vocab, merges) = tiny_tokenizer_files(&dir);
    let config = tokenizer_config();
    assert_eq!(
        Tokenizer::for_model(&dir, &config).unwrap().encode(" the"),
        [256, 257]
    );
    for (file, bytes) in [("vocab.json", &vocab), ("merges.txt", &merges)] {
        let path = dir.join(file);
        // Every cut of merges.txt; vocab.json's cuts are all invalid JSON, so every 7th will do.
        let step = if file == "vocab.json" { 7 } else { 1 };
        for len in (0..bytes.len()).step_by(step) {
            std::fs::write(&path, &bytes[..len]).unwrap();
            // A cut at a line or character boundary of merges.txt may leave a valid, shorter
            // list of merges; anything else is an error naming the file.
            match Tokenizer::for_model(&dir, &config) {
                Ok(_) => assert!(file == "merges.txt", "{file} cut at {len} loaded"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.starts_with(&path.display().to_string()), "{e}");
                }
            }
        }
        std::fs::write(&path, bytes).unwrap();
    }
}

#[test]
fn tokenizer_files_of_the_wrong_kind_are_named() {
    let dir = scratch("transformer-hostile-tokenizer-kind");
    tiny_tokenizer_files(&dir);
    let config = tokenizer_config();
    let vocab = dir.join("vocab.json");
    let cases: [(&[u8], &str); 4] = [
        (b"[]", "expected a JSON object"),
        (
            br#"{"a": "zero"}"#,
            "entry `a`: expected a token id, found \"zero\"",
        ),
        (br#"{"a": 4294967296}"#, "entry `a`: expected a token id"),
        (&[b'{', 0xC3, b'}'], "not UTF-8 text"),
    ];
    for (text, want) in cases {
        std::fs::write(&vocab, text).unwrap();
        let e = Tokenizer::for_model(&dir, &config).unwrap_err().to_string();
        assert!(e.starts_with(&vocab.display().to_string()), "{e}");
        assert!(e.contains(want), "{e}");
    }
    // A vocabulary with ids past the model's vocab_size.
    tiny_tokenizer_files(&dir);
    let e = Tokenizer::for_model(&dir, &tiny_config())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ids up to 258, but config.json's vocab_size is 256"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Mutation fuzzing

/// A damaged model directory: JSON edits to the safetensors header (re-serialised with its true
/// length), then byte mutations of the file, and JSON edits to config.json.
#[derive(Clone, Debug)]
struct ModelDamage {
    header: Vec<JsonEdit>,
    bytes: Vec<Mutation>,
    config: Vec<JsonEdit>,
    config_bytes: Vec<Mutation>,
}

fn model_damage() -> impl Strategy<Value = ModelDamage> {
    (
        prop::collection::vec(json_edit(), 0..3),
        prop::collection::vec(mutation(), 0..3),
        prop::collection::vec(json_edit(), 0..2),
        prop::collection::vec(mutation(), 0..2),
    )
        .prop_map(|(header, bytes, config, config_bytes)| ModelDamage {
            header,
            bytes,
            config,
            config_bytes,
        })
}

#[test]
fn fuzz_mutated_model_directories_never_panic() {
    let (dir, model) = tiny_model_dir("fuzz-model");
    let config = std::fs::read(dir.join("config.json")).unwrap();
    let (header, data) = split(&model);
    let config_json: Value = serde_json::from_slice(&config).unwrap();
    fuzz(
        "model",
        model_damage(),
        ALLOCATION_BOUND,
        &dir.display().to_string(),
        |damage| {
            let mut h = header.clone();
            damage.header.iter().for_each(|e| edit_json(&mut h, e));
            let mut bytes = join(&h, &data);
            damage.bytes.iter().for_each(|m| apply(&mut bytes, m));
            let mut c = config_json.clone();
            damage.config.iter().for_each(|e| edit_json(&mut c, e));
            let mut config = c.to_string().into_bytes();
            damage
                .config_bytes
                .iter()
                .for_each(|m| apply(&mut config, m));
            std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
            std::fs::write(dir.join("config.json"), &config).unwrap();
        },
        || Checkpoint::load(&dir),
    );
}

#[test]
fn fuzz_mutated_tokenizer_files_never_panic() {
    let dir = scratch("transformer-hostile-fuzz-tokenizer");
    let (vocab, merges) = tiny_tokenizer_files(&dir);
    let vocab_json: Value = serde_json::from_slice(&vocab).unwrap();
    let config = tokenizer_config();
    let strategy = (
        prop::collection::vec(json_edit(), 0..3),
        prop::collection::vec(mutation(), 0..3),
        prop::collection::vec(mutation(), 0..3),
    );
    fuzz(
        "tokenizer",
        strategy,
        ALLOCATION_BOUND,
        &dir.display().to_string(),
        |(edits, vocab_bytes, merges_bytes)| {
            let mut v = vocab_json.clone();
            edits.iter().for_each(|e| edit_json(&mut v, e));
            let mut vocab = v.to_string().into_bytes();
            vocab_bytes.iter().for_each(|m| apply(&mut vocab, m));
            let mut merges = merges.clone();
            merges_bytes.iter().for_each(|m| apply(&mut merges, m));
            std::fs::write(dir.join("vocab.json"), &vocab).unwrap();
            std::fs::write(dir.join("merges.txt"), &merges).unwrap();
        },
        // Loaded tokenizers must also encode and decode without panicking.
        || Tokenizer::for_model(&dir, &config).map(|t| t.decode(&t.encode(" the héllo"))),
    );
}
