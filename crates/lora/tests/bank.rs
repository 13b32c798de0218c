//! The adapter bank on the fixture `tests/fixtures/gpt2-tiny` (on the CPU and on the GPU):
//! 1. a mixed batch (two random adapters of different rank and targets, PEFT's fixture adapter,
//!    and a sequence on the base model) gives, row by row, the logits of that sequence's adapter
//!    attached alone (within 1e-5);
//! 2. the same through the KV cache (prefill, then one token), as a server generates;
//! 3. the active adapter serves every sequence; deleting an adapter resets a routing that named it;
//! 4. what cannot be served is refused with a message.

mod common;

use tensor::on_devices;

use autograd::Tape;
use common::{batch, fixture, model};
use lora::{AdapterBank, BiasMode, Init, LoraConfig, LoraModel, Routing, Target};
use tensor::Device;
use transformer::{Gpt2, KvCache};

/// T: the fixture's 24 ids as 4 sequences of 6.
const T: usize = 6;

/// Adapter "a": q, v at rank 4. Adapter "b": c_attn, o, fc, proj at rank 2 (3 for fc) with
/// other α, layer 1 only. Both with random B, so they change the logits.
fn adapters(model: &Gpt2) -> [LoraModel; 2] {
    let mut a = LoraConfig::new(4, 8.0, &[Target::Q, Target::V]);
    a.init = Init::BothRandom;
    let mut b = LoraConfig::new(
        2,
        3.0,
        &[Target::CAttn, Target::O, Target::Fc, Target::Proj],
    );
    b.init = Init::BothRandom;
    b.layers = Some(vec![1]);
    b.rank_pattern.insert(Target::Fc, 3);
    [
        LoraModel::new(model, &a, 1).unwrap(),
        LoraModel::new(model, &b, 2).unwrap(),
    ]
}

/// The bank "a", "b", "peft" (the fixture's PEFT adapter), attached to `model`.
fn bank(model: &mut Gpt2) -> (AdapterBank, Vec<LoraModel>) {
    let [a, b] = adapters(model);
    let peft = LoraModel::load_peft(fixture().join("adapter"), model)
        .unwrap()
        .lora;
    let mut bank = AdapterBank::new(model);
    bank.insert("a", &a).unwrap();
    bank.insert("b", &b).unwrap();
    bank.load_peft("peft", fixture().join("adapter"), model)
        .unwrap();
    bank.attach(model).unwrap();
    (bank, vec![a, b, peft])
}

/// Logits (rows·V) of `ids` as `b` sequences of `t`.
fn logits(model: &Gpt2, ids: &[u32], b: usize, t: usize) -> Vec<f32> {
    let tape = Tape::inference();
    model
        .logits(&tape, ids, b, t)
        .unwrap()
        .value
        .to_vec()
        .unwrap()
}

/// Logits of one sequence with `lora` attached alone (or the base model for `None`).
fn alone(model: &mut Gpt2, lora: Option<&mut LoraModel>, ids: &[u32]) -> Vec<f32> {
    let Some(lora) = lora else {
        return logits(model, ids, 1, ids.len());
    };
    lora.attach(model).unwrap();
    let out = logits(model, ids, 1, ids.len());
    lora.detach(model).unwrap();
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn mixed_batch_matches_each_adapter_alone(device: &Device) {
    let mut model = model(device);
    let (ids, _, _) = batch();
    let v = model.config.vocab_size;
    let (mut bank, mut loras) = bank(&mut model);
    let route = [Some("b"), None, Some("a"), Some("peft")];
    bank.route(&route).unwrap();
    let mixed = logits(&model, &ids, 4, T);
    bank.detach(&mut model).unwrap();
    println!("== {device:?}");
    for (s, name) in route.iter().enumerate() {
        let seq = &ids[s * T..(s + 1) * T];
        let lora =
            name.map(|n| &mut loras[["a", "b", "peft"].iter().position(|m| *m == n).unwrap()]);
        let want = alone(&mut model, lora, seq);
        let base = alone(&mut model, None, seq);
        let got = &mixed[s * T * v..(s + 1) * T * v];
        let (diff, moved) = (max_diff(got, &want), max_diff(&want, &base));
        println!(
            "sequence {s} ({name:?}): max |mixed − alone| {diff:.2e}; \
             the adapter moves logits by {moved:.2e}"
        );
        assert!(diff <= 1e-5, "sequence {s} ({name:?}): {diff}");
        if name.is_some() {
            assert!(
                moved > 1e-2,
                "sequence {s}: adapter {name:?} changes nothing, the test is vacuous"
            );
        }
    }
}
on_devices!(
    mixed_batch_matches_each_adapter_alone,
    mixed_batch_matches_each_adapter_alone_cpu,
    mixed_batch_matches_each_adapter_alone_gpu
);

fn mixed_batch_through_the_kv_cache(device: &Device) {
    // Prefill 5 tokens of each sequence, then one more: the last step's logits must be the
    // sixth row of the uncached forward, sequence by sequence.
    let mut model = model(device);
    let (ids, _, _) = batch();
    let v = model.config.vocab_size;
    let (mut bank, _) = bank(&mut model);
    bank.route(&[Some("peft"), Some("a"), None, Some("b")])
        .unwrap();
    let full = logits(&model, &ids, 4, T);
    let seqs: Vec<&[u32]> = ids.chunks(T).collect();
    let prefix: Vec<u32> = seqs.iter().flat_map(|s| s[..T - 1].to_vec()).collect();
    let last: Vec<u32> = seqs.iter().map(|s| s[T - 1]).collect();
    let mut cache = KvCache::new(&model.config, 4, device).unwrap();
    let tape = Tape::inference();
    model
        .logits_cached(&tape, &prefix, 4, T - 1, &mut cache)
        .unwrap();
    let step = model
        .logits_cached(&tape, &last, 4, 1, &mut cache)
        .unwrap()
        .value
        .to_vec()
        .unwrap();
    for s in 0..4 {
        let want = &full[(s * T + T - 1) * v..][..v];
        let diff = max_diff(&step[s * v..(s + 1) * v], want);
        assert!(diff <= 1e-5, "sequence {s}: cached step differs by {diff}");
    }
}
on_devices!(mixed_batch_through_the_kv_cache, kv_cache_cpu, kv_cache_gpu);

fn active_adapter_and_removal(device: &Device) {
    let mut model = model(device);
    let (ids, _, _) = batch();
    let (mut bank, mut loras) = bank(&mut model);
    assert_eq!(bank.names(), ["a", "b", "peft"]);
    bank.set_active(Some("b")).unwrap();
    let active = logits(&model, &ids, 4, T);
    bank.route(&[Some("b"); 4]).unwrap();
    assert_eq!(
        active,
        logits(&model, &ids, 4, T),
        "active = every sequence routed to it"
    );
    // Deleting "a" keeps "b" active and reindexes the stacks; deleting "b" resets to the base.
    bank.remove("a").unwrap();
    bank.set_active(Some("b")).unwrap();
    assert_eq!(active, logits(&model, &ids, 4, T));
    bank.remove("b").unwrap();
    assert_eq!(bank.routing(), Routing::All(None));
    let base_via_bank = logits(&model, &ids, 4, T);
    bank.detach(&mut model).unwrap();
    assert_eq!(
        base_via_bank,
        logits(&model, &ids, 4, T),
        "no adapter: the base model, bit for bit"
    );
    // The bank holds copies: removing them leaves the LoraModels usable.
    assert!(alone(&mut model, Some(&mut loras[0]), &ids[..T]).len() == T * model.config.vocab_size);
}
on_devices!(active_adapter_and_removal, active_cpu, active_gpu);

#[test]
fn what_cannot_be_served_is_refused() {
    let mut model = model(&Device::cpu());
    let (mut bank, loras) = bank(&mut model);
    let err = |r: lora::Result<()>| r.unwrap_err().to_string();
    assert!(err(bank.insert("a", &loras[0])).contains("already holds an adapter `a`"));
    assert!(err(bank.route(&[Some("c")])).contains("no adapter `c` (it holds: a, b, peft)"));
    assert!(err(bank.remove("c")).contains("no adapter `c`"));
    let mut cfg = LoraConfig::new(2, 4.0, &[Target::O]);
    cfg.bias = BiasMode::All;
    let with_bias = LoraModel::new(&model, &cfg, 3).unwrap();
    assert!(err(bank.insert("bias", &with_bias)).contains("trains biases"));
    let merged = LoraModel::new(&model, &LoraConfig::new(2, 4.0, &[Target::O]), 4).unwrap();
    merged.merge(&model).unwrap();
    assert!(err(bank.insert("merged", &merged)).contains("unmerge it first"));
    merged.unmerge(&model).unwrap();
    // Routing 3 sequences, serving 4.
    bank.route(&[Some("a"), None, Some("b")]).unwrap();
    let (ids, _, _) = batch();
    let tape = Tape::inference();
    let Err(e) = model.logits(&tape, &ids, 4, T) else {
        panic!("4 sequences served, 3 routed: must fail");
    };
    let e = e.to_string();
    assert!(e.contains("routes 3 sequences, but the batch has 4"), "{e}");
    assert!(err(bank.attach(&mut model)).contains("already attached"));
}
