//! Model directories as `transformers` 5 writes them (`tests/fixtures/hf-models`, made by its
//! `make.py`): each loads and scores as `transformers` scores it in float64, or is refused by
//! name. Tokenizers: added special tokens, a literal `<|endoftext|>`, a directory's own BPE in
//! `tokenizer.json` or in `vocab.json` + `merges.txt`. Configs: every activation, attention scale,
//! MLP width and untied head `make.py` writes, forward (loss) and backward (every gradient), on
//! the CPU and, when there is one, the GPU. Storage: sharded safetensors.

use std::path::PathBuf;

use autograd::{Grads, Tape};
use integration_tests::{check_tensor, get, read_f64};
use serde_json::Value;
use tensor::Device;
use transformer::{Checkpoint, Gpt2, Tokenizer};

fn dir(name: &str) -> PathBuf {
    integration_tests::fixture("hf-models").join(name)
}

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(dir(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Inputs, next-token targets and weights of one sequence (the last position not counted), as
/// `transformers` computes `loss` with `labels=input_ids`.
fn batch(ids: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut targets = ids[1..].to_vec();
    targets.push(0);
    let mut weights = vec![1.0; ids.len()];
    *weights.last_mut().unwrap() = 0.0;
    (targets, weights)
}

fn loss(model: &Gpt2, ids: &[u32]) -> f64 {
    let (targets, weights) = batch(ids);
    let tape = Tape::inference();
    let l = model
        .loss(&tape, ids, &targets, &weights, 1, ids.len())
        .unwrap();
    l.value.to_vec().unwrap()[0] as f64
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

/// Every text of a tokenizer fixture: our ids are `transformers`' ids, our loss its loss.
fn tokenizer_fixture_matches(name: &str) -> Tokenizer {
    let ckpt = Checkpoint::load(dir(name)).unwrap();
    let tok = Tokenizer::for_model(dir(name), &ckpt.config).unwrap();
    let model = Gpt2::from_checkpoint(&ckpt, &Device::cpu(), false).unwrap();
    let want = expected(name);
    assert_eq!(
        tok.vocab_size() as u64,
        want["vocab_size"].as_u64().unwrap()
    );
    for case in want["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode_with_special(text);
        assert_eq!(ids, ids_of(&case["ids"]), "{name}: ids of {text:?}");
        let (got, hf) = (loss(&model, &ids), case["loss_f64"].as_f64().unwrap());
        assert!(
            (got - hf).abs() < 1e-4,
            "{name}: loss of {text:?} {got} vs HF {hf}"
        );
        assert_eq!(tok.decode(&ids), text, "{name}: decode");
    }
    tok
}

#[test]
fn added_special_token_and_endoftext_are_what_transformers_makes_of_them() {
    // Bug 3 and 5: `<|sep|>` (id 300, an added token) and `<|endoftext|>` (id 0) in the text.
    for name in ["bpe-added", "bpe-added-v4"] {
        let tok = tokenizer_fixture_matches(name);
        let specials = tok.special_tokens();
        assert!(
            specials.contains(&("<|sep|>".to_string(), 300)),
            "{specials:?}"
        );
        assert!(tok.describe().contains("<|sep|>"), "{}", tok.describe());
        // Plain `encode` reads them as characters: no special id.
        let plain = tok.encode("a question<|sep|> an answer<|endoftext|>");
        assert!(!plain.contains(&300) && !plain.contains(&0), "{plain:?}");
        assert_eq!(tok.eot(), Some(0));
    }
}

#[test]
fn a_directorys_own_bpe_is_used_from_tokenizer_json_or_vocab_and_merges() {
    // Bug 4 (tokenizer.json only, not GPT-2's) and the own smaller BPE (vocab.json + merges.txt).
    let json = tokenizer_fixture_matches("bpe-own");
    assert!(
        json.describe().starts_with("tokenizer.json"),
        "{}",
        json.describe()
    );
    let files = tokenizer_fixture_matches("bpe-own-v4");
    assert!(
        files.describe().starts_with("vocab.json + merges.txt"),
        "{}",
        files.describe()
    );
    // Our own BPE (the teaching version) gives the same ids for these files.
    let ours = Tokenizer::from_files(
        dir("bpe-own-v4").join("vocab.json"),
        dir("bpe-own-v4").join("merges.txt"),
    )
    .unwrap();
    for case in expected("bpe-own-v4")["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(ours.encode(text), ids_of(&case["ids"]), "{text:?}");
    }
}

#[test]
fn a_model_without_tokenizer_files_and_another_vocabulary_is_refused() {
    // The model of `bpe-own` (its own vocabulary of 369) with its tokenizer files taken away: GPT-2's built-in
    // tokenizer would give ids the model never saw.
    let scratch = std::env::temp_dir().join(format!("hf-models-notok-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir("bpe-own").join(f), scratch.join(f)).unwrap();
    }
    let ckpt = Checkpoint::load(&scratch).unwrap();
    let e = Tokenizer::for_model(&scratch, &ckpt.config)
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&scratch).unwrap();
    let v = expected("bpe-own")["vocab_size"].as_u64().unwrap();
    assert!(
        e.contains("ships no tokenizer files")
            && e.contains(&format!("50257 ids where config.json's vocab_size is {v}")),
        "{e}"
    );
}

/// Loss and every gradient of a config-variant fixture against `transformers`' float64.
fn variant_matches(name: &str, device: &Device) {
    let ckpt = Checkpoint::load(dir(name)).unwrap();
    let model = Gpt2::from_checkpoint(&ckpt, device, true).unwrap();
    let want_json = expected(name);
    let text = want_json["text"].as_str().unwrap();
    let ids: Vec<u32> = text.bytes().map(u32::from).collect();
    let (targets, weights) = batch(&ids);
    let tape = Tape::new();
    let l = model
        .loss(&tape, &ids, &targets, &weights, 1, ids.len())
        .unwrap();
    let mut grads = Grads::new();
    tape.backward(&l, &mut grads).unwrap();
    let got = l.value.to_vec().unwrap()[0] as f64;
    let hf = want_json["loss_f64"].as_f64().unwrap();
    assert!((got - hf).abs() < 1e-4, "{name}: loss {got} vs HF {hf}");
    let path = dir(name).join("expected.safetensors");
    if !path.exists() {
        return; // storage fixtures (shards, pickles) carry the loss only
    }
    let want = read_f64(&path);
    let mut ok = true;
    for p in model.named_params() {
        let g = grads.get(p.as_trainable().unwrap().id).unwrap();
        let key = format!("grad_f64.{}", p.name());
        ok &= check_tensor(p.name(), &g.to_vec().unwrap(), get(&want, &key), 1e-4, 1e-3);
    }
    assert!(
        ok,
        "{name} on {device:?}: gradients differ from transformers"
    );
}

const VARIANTS: [&str; 10] = [
    "act-gelu_new",
    "act-gelu_fast",
    "act-gelu",
    "act-relu",
    "act-silu",
    "act-quick_gelu",
    "scale-inv-layer",
    "no-scale-attn",
    "n-inner",
    "untied-head",
];

#[test]
fn config_variants_match_transformers_forward_and_backward_cpu() {
    for name in VARIANTS {
        variant_matches(name, &Device::cpu());
    }
}

#[test]
fn config_variants_match_transformers_forward_and_backward_gpu() {
    if let Some(g) = tensor::testing::gpu() {
        for name in VARIANTS {
            variant_matches(name, &g);
        }
    }
}

#[test]
fn sharded_safetensors_load() {
    let ckpt = Checkpoint::load(dir("sharded")).unwrap();
    assert_eq!(ckpt, Checkpoint::load(dir("sharded")).unwrap());
    variant_matches("sharded", &Device::cpu());
}

#[test]
fn untied_head_round_trips_through_save() {
    let ckpt = Checkpoint::load(dir("untied-head")).unwrap();
    assert!(ckpt.get("lm_head.weight").is_some());
    let out = std::env::temp_dir().join(format!("hf-models-untied-{}", std::process::id()));
    ckpt.save(&out).unwrap();
    let back = Checkpoint::load(&out).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    assert_eq!(back, ckpt);
}

#[test]
fn other_architectures_and_formats_are_refused_by_name() {
    let e = Checkpoint::load(dir("llama-config"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model_type \"llama\"") && e.contains("GPT-2 only"),
        "{e}"
    );
}

#[test]
fn pytorch_model_bin_loads_as_transformers_loads_it() {
    // f32 storages, with `lm_head.weight` sharing `wte`'s storage; and f16 storages.
    for name in ["torch-bin", "torch-bin-f16"] {
        variant_matches(name, &Device::cpu());
    }
    assert_eq!(
        Checkpoint::load(dir("torch-bin")).unwrap(),
        Checkpoint::load(dir("sharded")).unwrap()
    );
}
