//! Model directories: the PyTorch-made fixture loads, saves round-trip, other dtypes and key
//! spellings load, and every kind of bad directory fails with a message naming file and tensor.
//!
//! `cargo test -p transformer --test checkpoint`

use std::path::Path;

use integration_tests::Scratch;
use integration_tests::gpt2_tiny::dir as fixture;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use transformer::tensor_file::{read_tensors, write_tensors};
use transformer::{Checkpoint, NamedTensor, SaveDtype};

/// A fresh empty directory, removed when dropped.
fn scratch(tag: &str) -> Scratch {
    integration_tests::scratch(&format!("transformer-ckpt-{tag}"))
}

/// Writes the fixture's config and the given tensors (names as given, f32) into `dir`.
fn write_model(dir: &Path, tensors: &[NamedTensor]) {
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    let views = tensors.iter().map(|(n, s, d)| (n.clone(), &s[..], &d[..]));
    write_tensors(&dir.join("model.safetensors"), views, SaveDtype::F32, None).unwrap();
}

/// The fixture's tensors as stored, `transformer.`-prefixed.
fn fixture_tensors() -> Vec<NamedTensor> {
    read_tensors(&fixture().join("model.safetensors")).unwrap()
}

fn load_error(dir: &Path) -> String {
    Checkpoint::load(dir).unwrap_err().to_string()
}

#[test]
fn loads_the_pytorch_fixture() {
    let ckpt = Checkpoint::load(fixture()).unwrap();
    let c = &ckpt.config;
    assert_eq!(
        (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_positions),
        (2, 4, 64, 256, 64)
    );
    assert_eq!(ckpt.tensors.len(), 2 + 2 * 12 + 2);
    let names: Vec<_> = ckpt
        .tensors
        .iter()
        .map(|(n, s, _)| (n.clone(), s.clone()))
        .collect();
    assert_eq!(names, transformer::parameter_shapes(c));
    // Values read with Python's struct module from the file.
    let (shape, wte) = ckpt.get("wte.weight").unwrap();
    assert_eq!(shape, [256, 64]);
    assert_eq!(
        (wte[0], wte[1], wte[255 * 64 + 63]),
        (0.037719067, -0.03963146, -0.48173302)
    );
    let (_, ln_f_b) = ckpt.get("ln_f.bias").unwrap();
    assert_eq!((ln_f_b[0], ln_f_b[63]), (0.014400202, -0.16824588));
    let (shape, proj) = ckpt.get("h.1.mlp.c_proj.weight").unwrap();
    assert_eq!(shape, [256, 64]); // (4C, C)
    assert_eq!((proj[0], proj[255 * 64 + 63]), (-0.111855455, -0.04019476));
}

#[test]
fn save_then_load_is_bit_exact_and_speaks_transformers() {
    let ckpt = Checkpoint::load(fixture()).unwrap();
    let dir = scratch("roundtrip");
    ckpt.save(&dir).unwrap();
    ckpt.save(&dir).unwrap(); // replacing an existing checkpoint works too
    let back = Checkpoint::load(&dir).unwrap();
    assert_eq!(back.config, ckpt.config);
    for ((n, s, a), (m, t, b)) in ckpt.tensors.iter().zip(&back.tensors) {
        assert_eq!((n, s), (m, t));
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{n} changed"
        );
    }

    // The file is what GPT2LMHeadModel.save_pretrained writes: prefixed keys, F32, no lm_head,
    // metadata format "pt".
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.len(), ckpt.tensors.len());
    for (name, view) in file.iter() {
        assert!(
            name.starts_with("transformer.") && !name.contains("lm_head"),
            "{name}"
        );
        assert_eq!(view.dtype(), Dtype::F32);
    }
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["config.json", "model.safetensors"],
        "no temporary file left"
    );
}

#[test]
fn f16_storage_halves_the_file_and_rounds_to_nearest() {
    let ckpt = Checkpoint::load(fixture()).unwrap();
    let dir = scratch("f16");
    ckpt.save_as(&dir, SaveDtype::F16).unwrap();
    let size = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    let f32_size = std::fs::metadata(fixture().join("model.safetensors"))
        .unwrap()
        .len();
    assert!(size < f32_size / 2 + 4096, "{size} vs {f32_size}");
    let back = Checkpoint::load(&dir).unwrap();
    for ((n, _, a), (_, _, b)) in ckpt.tensors.iter().zip(&back.tensors) {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(half::f16::from_f32(*x).to_f32(), *y, "{n}");
        }
    }
}

#[test]
fn reads_bf16_without_prefix_with_tied_lm_head_and_attention_buffers() {
    // Written with the safetensors crate directly, as the Hub's openai-community/gpt2 is laid
    // out: no `transformer.` prefix, the causal-mask buffers `h.{i}.attn.bias` present.
    let tensors = fixture_tensors();
    let to_bf16 = |d: &[f32]| {
        d.iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let mut stored: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.trim_start_matches("transformer.").to_string(),
                s.clone(),
                Dtype::BF16,
                to_bf16(d),
            )
        })
        .collect();
    let wte = stored.iter().find(|t| t.0 == "wte.weight").unwrap().clone();
    stored.push(("lm_head.weight".into(), wte.1, Dtype::BF16, wte.3));
    stored.push((
        "h.0.attn.bias".into(),
        vec![1, 1, 2, 2],
        Dtype::U8,
        vec![1, 0, 1, 1],
    ));
    stored.push((
        "h.1.attn.masked_bias".into(),
        vec![],
        Dtype::BF16,
        to_bf16(&[-1e4]),
    ));
    let views: Vec<_> = stored
        .iter()
        .map(|(n, s, t, b)| (n.clone(), TensorView::new(*t, s.clone(), b).unwrap()))
        .collect();

    let dir = scratch("bf16");
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let ckpt = Checkpoint::load(&dir).unwrap();
    assert_eq!(ckpt.tensors.len(), tensors.len());
    for (n, _, a) in &tensors {
        let (_, b) = ckpt.get(n.trim_start_matches("transformer.")).unwrap();
        for (x, y) in a.iter().zip(b) {
            assert_eq!(half::bf16::from_f32(*x).to_f32(), *y, "{n}");
        }
    }
}

#[test]
fn missing_tensor_is_named_with_its_shape_and_the_file() {
    let dir = scratch("missing");
    let tensors: Vec<_> = fixture_tensors()
        .into_iter()
        .filter(|t| t.0 != "transformer.h.1.ln_2.bias")
        .collect();
    write_model(&dir, &tensors);
    let e = load_error(&dir);
    let file = dir.join("model.safetensors").display().to_string();
    assert!(
        e.starts_with(&format!("{file}: missing 1 tensor(s)")),
        "{e}"
    );
    assert!(e.contains("`h.1.ln_2.bias` [64]"), "{e}");
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let dir = scratch("shape");
    let mut tensors = fixture_tensors();
    let ln_f = tensors
        .iter_mut()
        .find(|t| t.0 == "transformer.ln_f.weight")
        .unwrap();
    ln_f.1 = vec![32, 2];
    write_model(&dir, &tensors);
    let e = load_error(&dir);
    assert!(
        e.contains("model.safetensors: tensor `ln_f.weight`: expected shape [64], found [32, 2]"),
        "{e}"
    );
}

#[test]
fn untied_lm_head_is_refused_and_tied_one_accepted() {
    let dir = scratch("lm-head");
    let mut tensors = fixture_tensors();
    let mut head = tensors
        .iter()
        .find(|t| t.0 == "transformer.wte.weight")
        .unwrap()
        .clone();
    head.0 = "lm_head.weight".into();
    tensors.push(head);
    write_model(&dir, &tensors);
    assert_eq!(
        Checkpoint::load(&dir).unwrap(),
        Checkpoint::load(fixture()).unwrap()
    );

    tensors.last_mut().unwrap().2[7] += 1.0;
    write_model(&dir, &tensors);
    let e = load_error(&dir);
    assert!(
        e.contains("model.safetensors: tensor `lm_head.weight` differs from `wte.weight`"),
        "{e}"
    );
}

#[test]
fn unknown_and_duplicate_tensors_are_refused() {
    let dir = scratch("extra");
    let mut tensors = fixture_tensors();
    let ln = tensors
        .iter()
        .find(|t| t.0 == "transformer.h.1.ln_1.weight")
        .unwrap()
        .clone();
    tensors.push((
        "transformer.h.2.ln_1.weight".into(),
        ln.1.clone(),
        ln.2.clone(),
    ));
    write_model(&dir, &tensors);
    let e = load_error(&dir);
    assert!(
        e.contains("1 tensor(s) not in the GPT-2 size table for config (L=2 C=64"),
        "{e}"
    );
    assert!(e.contains("`h.2.ln_1.weight`"), "{e}");

    tensors.pop();
    tensors.push(("h.1.ln_1.weight".into(), ln.1, ln.2));
    write_model(&dir, &tensors);
    let e = load_error(&dir);
    assert!(e.contains("tensor `h.1.ln_1.weight` appears twice"), "{e}");
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = scratch("dtype");
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    let bytes = 7i32.to_le_bytes().to_vec();
    let view = TensorView::new(Dtype::I32, vec![1], &bytes).unwrap();
    safetensors::serialize_to_file([("wte.weight", view)], None, &dir.join("model.safetensors"))
        .unwrap();
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `wte.weight`: expected dtype F32, F16 or BF16, found I32"),
        "{e}"
    );
}

#[test]
fn bad_or_missing_files_name_the_file() {
    let dir = scratch("config");
    write_model(&dir, &fixture_tensors());
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"n_layer": 2, "n_head": "4", "n_embd": 64, "vocab_size": 256, "n_positions": 64}"#,
    )
    .unwrap();
    let e = load_error(&dir);
    let want = format!(
        "{}: invalid GPT-2 config: field `n_head`: expected a non-negative integer, found \"4\"",
        config.display()
    );
    assert_eq!(e, want);

    std::fs::remove_file(&config).unwrap();
    assert!(load_error(&dir).starts_with(&config.display().to_string()));

    std::fs::copy(fixture().join("config.json"), &config).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_error(&dir);
    assert!(
        e.starts_with(&dir.join("model.safetensors").display().to_string()),
        "{e}"
    );
}
