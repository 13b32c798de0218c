//! Generation and beam search on the tiny fixture (2 layers, C = 64, V = 256 bytes, context 64)
//! on the CPU and, where cheap, the GPU; sampling filters on hand-made logits.

use autograd::Tape;
use tensor::Device;
use tensor::testing::random_vec;
use transformer::beam::{banned_tokens, beam_score, log_softmax};
use transformer::generate::{argmax, last_logits, sampling_distribution};
use transformer::model::KvCache;
use transformer::{
    BeamConfig, Checkpoint, GenerateConfig, Gpt2, GptConfig, StopReason, Tokenizer, TokenizerKind,
    beam_search, generate, generate_tokens, parameter_shapes,
};

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/gpt2-tiny"
);

fn tiny(device: &Device) -> Gpt2 {
    Gpt2::from_checkpoint(&Checkpoint::load(DIR).unwrap(), device, false).unwrap()
}

fn ids(text: &str) -> Vec<u32> {
    Tokenizer::bytes().encode(text)
}

fn greedy(n: usize) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens: n,
        ..GenerateConfig::default()
    }
}

fn sampled(n: usize, seed: u64) -> GenerateConfig {
    GenerateConfig {
        temperature: 1.0,
        seed,
        ..greedy(n)
    }
}

/// Greedy or sampled continuation of one prompt.
fn one(model: &Gpt2, prompt: &[u32], cfg: &GenerateConfig, eot: Option<u32>) -> Vec<u32> {
    let mut out = generate_tokens(model, &[prompt.to_vec()], cfg, eot).unwrap();
    out.pop().unwrap()
}

/// The last position's logits of a full forward over `seq`: no cache, everything recomputed.
fn recomputed_logits(model: &Gpt2, seq: &[u32]) -> Vec<f32> {
    let tape = Tape::inference();
    let logits = model.logits(&tape, seq, 1, seq.len()).unwrap().value;
    let start = (seq.len() - 1) * model.config.vocab_size;
    logits.to_vec().unwrap()[start..].to_vec()
}

/// Σ log p(new token | everything before it) under a full forward.
fn sum_logp(model: &Gpt2, prompt: &[u32], new: &[u32]) -> f64 {
    let mut seq = prompt.to_vec();
    let mut sum = 0.0;
    for &token in new {
        sum += log_softmax(&recomputed_logits(model, &seq))[token as usize];
        seq.push(token);
    }
    sum
}

fn cached_decoding_matches_recomputation(device: &Device) {
    let model = tiny(device);
    let prompt = ids("Hello, world");
    let steps = 40; // to position 52 of 64
    let mut cache = KvCache::new(&model.config, 1, device).unwrap();
    let mut logits = last_logits(&model, &mut cache, &prompt, 1, prompt.len()).unwrap();
    let (mut seq, mut max_diff) = (prompt.clone(), 0.0f32);
    for _ in 0..steps {
        let want = recomputed_logits(&model, &seq);
        for (a, b) in logits.iter().zip(&want) {
            max_diff = max_diff.max((a - b).abs());
        }
        assert_eq!(argmax(&logits), argmax(&want));
        seq.push(argmax(&logits));
        logits = last_logits(&model, &mut cache, &seq[seq.len() - 1..], 1, 1).unwrap();
    }
    println!("{device:?}: max |cached − recomputed| logit over {steps} steps: {max_diff:e}");
    assert!(max_diff <= 1e-5, "max difference {max_diff}");
    let generated = one(&model, &prompt, &greedy(steps), None);
    assert_eq!(generated, seq[prompt.len()..]);
}

tensor::on_devices!(
    cached_decoding_matches_recomputation,
    cached_decoding_matches_recomputation_cpu,
    cached_decoding_matches_recomputation_gpu
);

/// Prompts of 1 to 23 tokens at once equal each alone, greedy and sampled (sequence i seeded
/// with seed + i), with rows leaving the batch at different steps (an end-of-text token chosen
/// from the first prompt's output).
fn batch_equals_each_alone(device: &Device) {
    let model = tiny(device);
    let texts = [
        "The quick brown fox",
        "a",
        "Once upon a time there was",
        "Hi",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|p| ids(p)).collect();
    for cfg in [greedy(16), sampled(16, 7)] {
        let first = generate_tokens(&model, &prompts[..1], &cfg, None).unwrap();
        for eot in [None, Some(first[0][5])] {
            let batch = generate_tokens(&model, &prompts, &cfg, eot).unwrap();
            let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
            let tau = cfg.temperature;
            println!("{device:?} τ = {tau}, eot {eot:?}: lengths {lens:?}");
            for (i, p) in prompts.iter().enumerate() {
                let alone_cfg = GenerateConfig {
                    seed: cfg.seed + i as u64,
                    ..cfg.clone()
                };
                let alone = one(&model, p, &alone_cfg, eot);
                assert_eq!(batch[i], alone, "prompt {i}, τ {}", cfg.temperature);
            }
        }
    }
}

tensor::on_devices!(
    batch_equals_each_alone,
    batch_equals_each_alone_cpu,
    batch_equals_each_alone_gpu
);

#[test]
fn top_k_one_and_temperature_near_zero_are_greedy() {
    let model = tiny(&Device::cpu());
    let prompt = vec![ids("It was the best of times")];
    let want = generate_tokens(&model, &prompt, &greedy(24), None).unwrap();
    let top_1 = GenerateConfig {
        top_k: Some(1),
        ..sampled(24, 3)
    };
    let cold = GenerateConfig {
        temperature: 1e-5,
        ..sampled(24, 3)
    };
    for cfg in [top_1, cold] {
        assert_eq!(generate_tokens(&model, &prompt, &cfg, None).unwrap(), want);
    }
}

#[test]
fn same_seed_same_sample_other_seed_other_sample() {
    let model = tiny(&Device::cpu());
    let prompt = ids("Seeds: ");
    let top = sampling_distribution(&recomputed_logits(&model, &prompt), 1.0, None, None)[0].1;
    println!("most likely next token has p = {top:.3}"); // the fixture's distribution is spread
    let run = |seed| one(&model, &prompt, &sampled(32, seed), None);
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, one(&model, &prompt, &greedy(32), None));
}

#[test]
fn sampling_filters_on_hand_made_logits() {
    // Probabilities 0.1, 0.5, 0.05, 0.2, 0.15 for ids 0..5.
    let p = [0.1f32, 0.5, 0.05, 0.2, 0.15];
    let z: Vec<f32> = p.iter().map(|p| p.ln()).collect();
    let ids_of = |d: &[(u32, f64)]| d.iter().map(|e| e.0).collect::<Vec<_>>();
    let full = sampling_distribution(&z, 1.0, None, None);
    assert_eq!(ids_of(&full), [1, 3, 4, 0, 2]);
    for (id, q) in &full {
        assert!((q - f64::from(p[*id as usize])).abs() < 1e-6);
    }
    // Nucleus: the smallest most-likely-first set with Σ p ≥ top_p.
    for (top_p, want) in [
        (0.45, vec![1]),
        (0.6, vec![1, 3]),
        (0.8, vec![1, 3, 4]),
        (0.9, vec![1, 3, 4, 0]),
        (1.0, vec![1, 3, 4, 0, 2]),
    ] {
        let d = sampling_distribution(&z, 1.0, None, Some(top_p));
        assert_eq!(ids_of(&d), want, "top_p {top_p}");
        let kept: f64 = want.iter().map(|&i| f64::from(p[i as usize])).sum();
        assert!((d[0].1 - 0.5 / kept).abs() < 1e-6, "renormalised");
    }
    // Top-k first (the two largest: 0.5 and 0.2 become 5/7 and 2/7), then the nucleus of 0.7.
    let d = sampling_distribution(&z, 1.0, Some(2), Some(0.7));
    assert_eq!(ids_of(&d), [1]);
    let d = sampling_distribution(&z, 1.0, Some(2), Some(0.9));
    assert!((d[0].1 - 5.0 / 7.0).abs() < 1e-6 && d.len() == 2);
    // Ties with the k-th logit stay.
    let d = sampling_distribution(&[1.0, 3.0, 2.0, 2.0], 1.0, Some(2), None);
    assert_eq!(ids_of(&d), [1, 2, 3]);
    // Temperature 2: p ∝ exp(z / 2) = √p.
    let d = sampling_distribution(&z, 2.0, None, None);
    assert!((d[0].1 / d[1].1 - (0.5f64 / 0.2).sqrt()).abs() < 1e-5);
    // τ → 0 puts all the mass on the argmax.
    assert!(sampling_distribution(&z, 1e-4, None, None)[0].1 > 0.999_999);
}

#[test]
fn stop_strings_cut_the_text_and_eot_stops() {
    let model = tiny(&Device::cpu());
    let tok = Tokenizer::bytes();
    let full = &generate(&model, &tok, &["Stop "], &greedy(40)).unwrap()[0];
    assert_eq!(full.stopped, StopReason::MaxTokens);
    assert_eq!(full.tokens.len(), 40);
    // A stop string of two ASCII characters from the middle of the output.
    let chars: Vec<char> = full.text.chars().collect();
    let at = (5..chars.len() - 1)
        .find(|&i| chars[i].is_ascii() && chars[i + 1].is_ascii())
        .expect("two ASCII characters in a row");
    let stop: String = chars[at..at + 2].iter().collect();
    let cfg = GenerateConfig {
        stop_strings: vec!["never there".into(), stop.clone()],
        ..greedy(40)
    };
    let cut = &generate(&model, &tok, &["Stop "], &cfg).unwrap()[0];
    println!("{:?} stopped at {stop:?}: {:?}", full.text, cut.text);
    assert_eq!(cut.stopped, StopReason::StopString);
    assert_eq!(cut.text, full.text[..full.text.find(&stop).unwrap()]);
    let n = (1..=40).find(|&n| tok.decode(&full.tokens[..n]).contains(&stop));
    assert_eq!(cut.tokens, full.tokens[..n.unwrap()]);

    // End-of-text: one of the greedy tokens; the output stops at its first occurrence.
    let eot = full.tokens[6];
    let first = full.tokens.iter().position(|&t| t == eot).unwrap();
    let out = generate_tokens(&model, &[ids("Stop ")], &greedy(40), Some(eot)).unwrap();
    assert_eq!(out[0], full.tokens[..=first]);
}

/// A one-layer model with GPT-2's vocabulary whose next token is always end-of-text: ln_f's
/// weight is 0, so every position's final vector is ln_f's bias b, and wte[50256] = 10·b.
fn always_eot() -> Gpt2 {
    let config = GptConfig {
        n_layer: 1,
        n_head: 2,
        n_embd: 8,
        vocab_size: 50257,
        n_positions: 16,
        layer_norm_epsilon: 1e-5,
        tokenizer: TokenizerKind::Gpt2,
        variant: Default::default(),
    };
    let mut tensors = Vec::new();
    for (i, (name, shape)) in parameter_shapes(&config).into_iter().enumerate() {
        let mut values = random_vec(shape.iter().product(), i as u64);
        if name == "ln_f.weight" {
            values.fill(0.0);
        }
        tensors.push((name, shape, values));
    }
    let b: Vec<f32> = tensors
        .iter()
        .find(|t| t.0 == "ln_f.bias")
        .unwrap()
        .2
        .clone();
    let wte = &mut tensors.iter_mut().find(|t| t.0 == "wte.weight").unwrap().2;
    let eot_row = wte[50256 * 8..].iter_mut();
    eot_row.zip(&b).for_each(|(w, b)| *w = 10.0 * b);
    Gpt2::from_checkpoint(&Checkpoint::new(config, tensors), &Device::cpu(), false).unwrap()
}

#[test]
fn eot_and_context_end_a_generation() {
    let (model, tok) = (always_eot(), Tokenizer::gpt2());
    let out = &generate(&model, &tok, &["Hello"], &greedy(8)).unwrap()[0];
    assert_eq!(
        (&out.tokens[..], &out.text[..], out.stopped),
        (&[50256][..], "", StopReason::Eot)
    );
    // Without stop_at_eot it runs on: "Hello" is 1 token, so 8 more, then 7 to fill 16.
    let cfg = GenerateConfig {
        stop_at_eot: false,
        ..greedy(8)
    };
    let nine = "Hello".to_string() + &" Hello".repeat(8); // 9 tokens
    let out = generate(&model, &tok, &["Hello", &nine], &cfg).unwrap();
    let ends: Vec<_> = out.iter().map(|g| (g.tokens.len(), g.stopped)).collect();
    assert_eq!(ends, [(8, StopReason::MaxTokens), (7, StopReason::Context)]);
    assert!(out[0].text.starts_with("<|endoftext|>"));
    // A prompt that fills the context gets nothing.
    let full = vec![0u32; 16];
    let out = generate_tokens(&model, &[full], &greedy(8), None).unwrap();
    assert!(out[0].is_empty());
}

fn beam(beams: usize, n: usize, no_repeat: usize, eot: Option<u32>) -> BeamConfig {
    BeamConfig {
        beams,
        max_new_tokens: n,
        length_penalty: 0.8,
        no_repeat_ngram: no_repeat,
        eot,
    }
}

fn one_beam_is_greedy(device: &Device) {
    let model = tiny(device);
    let prompt = ids("Beam me up");
    let want = one(&model, &prompt, &greedy(20), None);
    let got = beam_search(&model, &prompt, &beam(1, 20, 0, None)).unwrap();
    assert_eq!(got, want);
    let eot = Some(want[7]);
    let want = one(&model, &prompt, &greedy(20), eot);
    let got = beam_search(&model, &prompt, &beam(1, 20, 0, eot)).unwrap();
    assert_eq!(got, want);
}

tensor::on_devices!(
    one_beam_is_greedy,
    one_beam_is_greedy_cpu,
    one_beam_is_greedy_gpu
);

#[test]
fn beams_score_at_least_greedy() {
    let model = tiny(&Device::cpu());
    // End-of-text off, or set to a token greedy decoding meets at step k.
    for (text, eot_at) in [
        ("Beam me up", None),
        ("The", None),
        ("Scores ", Some(4)),
        ("The", Some(9)),
    ] {
        let prompt = ids(text);
        let eot = eot_at.map(|k| one(&model, &prompt, &greedy(16), None)[k]);
        let greedy_out = &one(&model, &prompt, &greedy(16), eot);
        let beam_out = beam_search(&model, &prompt, &beam(4, 16, 0, eot)).unwrap();
        let score = |out: &[u32]| beam_score(sum_logp(&model, &prompt, out), out.len(), 0.8);
        let (g, b) = (score(greedy_out), score(&beam_out));
        println!(
            "{text:?}, eot {eot:?}: greedy {g:.4} ({} tokens), 4 beams {b:.4} ({})",
            greedy_out.len(),
            beam_out.len()
        );
        assert!(b >= g - 1e-9, "beam {b} < greedy {g}");
    }
}

/// An n-gram that ends at or after `from` and also occurs earlier in `seq`.
fn repeated_ngram(seq: &[u32], n: usize, from: usize) -> Option<&[u32]> {
    let grams: Vec<&[u32]> = seq.windows(n).collect();
    (from.saturating_sub(n - 1)..grams.len())
        .find_map(|j| grams[..j].contains(&grams[j]).then_some(grams[j]))
}

#[test]
fn no_repeat_ngram_is_honoured() {
    assert_eq!(banned_tokens(&[1, 2, 3, 1, 2], 3), [3]);
    assert_eq!(banned_tokens(&[1, 2, 1, 4, 1], 2), [2, 4]);
    assert_eq!(banned_tokens(&[5, 6], 4), Vec::<u32>::new());
    let model = tiny(&Device::cpu());
    let prompt = ids("aaaa bbbb");
    for n in [2, 3, 4] {
        let out = beam_search(&model, &prompt, &beam(3, 40, n, None)).unwrap();
        let seq: Vec<u32> = prompt.iter().chain(&out).copied().collect();
        assert_eq!(out.len(), 40);
        assert_eq!(repeated_ngram(&seq, n, prompt.len()), None, "n = {n}");
    }
    let free = beam_search(&model, &prompt, &beam(3, 40, 0, None)).unwrap();
    let seq: Vec<u32> = prompt.iter().chain(&free).copied().collect();
    let repeat = repeated_ngram(&seq, 2, prompt.len());
    println!("without the ban, a repeated 2-gram: {repeat:?}");
}

#[test]
fn bad_prompts_and_settings_are_errors() {
    let model = tiny(&Device::cpu());
    let tok = Tokenizer::bytes();
    let long = vec![65u32; 65]; // context is 64
    assert!(generate_tokens(&model, &[ids("ok"), long.clone()], &greedy(4), None).is_err());
    assert!(beam_search(&model, &long, &beam(2, 4, 0, None)).is_err());
    assert!(generate_tokens(&model, &[Vec::new()], &greedy(4), None).is_err());
    assert!(generate(&model, &tok, &[""], &greedy(4)).is_err());
    assert!(beam_search(&model, &[], &beam(2, 4, 0, None)).is_err());
    assert!(beam_search(&model, &ids("x"), &beam(0, 4, 0, None)).is_err());
    assert!(generate_tokens(&model, &[vec![256]], &greedy(4), None).is_err());
    let edits: [fn(&mut GenerateConfig); 4] = [
        |c| c.temperature = -1.0,
        |c| c.top_k = Some(0),
        |c| c.top_p = Some(0.0),
        |c| c.stop_strings = vec![String::new()],
    ];
    for edit in edits {
        let mut cfg = sampled(4, 0);
        edit(&mut cfg);
        assert!(generate(&model, &tok, &["x"], &cfg).is_err(), "{cfg:?}");
    }
    // No prompts, no outputs; zero new tokens, empty outputs.
    assert_eq!(
        generate_tokens(&model, &[], &greedy(4), None).unwrap(),
        Vec::<Vec<u32>>::new()
    );
    let out = &generate(&model, &tok, &["x"], &greedy(0)).unwrap()[0];
    assert_eq!((out.tokens.len(), out.stopped), (0, StopReason::MaxTokens));
}
