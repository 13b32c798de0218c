//! `train generate`: continue prompts with a model (sampling or beam search, KV cache).

use std::path::PathBuf;

use clap::Args;
use tensor::Device;
use transformer::{BeamConfig, GenerateConfig, Tokenizer, beam_search, generate};

/// Options of `train generate`.
#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Model directory: config.json + model.safetensors (+ vocab.json, merges.txt).
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter directory in PEFT's layout (ours or one PEFT saved), applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A prompt to continue; give several to generate them as one batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the smallest set of tokens whose probability reaches p (nucleus).
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (may be repeated).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Beam search with this many beams instead of sampling (the paper's E2E decoding: 10).
    #[arg(long)]
    pub beams: Option<usize>,
    /// Beam search: score = log-probability / length^penalty.
    #[arg(long, default_value_t = 0.8)]
    pub length_penalty: f32,
    /// Beam search: never repeat an n-gram of this size (0 = off).
    #[arg(long, default_value_t = 4)]
    pub no_repeat_ngram: usize,
}

/// `train generate`.
pub fn run(args: &GenerateArgs, device: &Device) -> crate::Result<()> {
    let (model, _lora) = crate::load_with_adapter(&args.model, args.adapter.as_deref(), device)?;
    let tokenizer = Tokenizer::for_model(&args.model, &model.config)?;
    if let Some(beams) = args.beams {
        for prompt in &args.prompt {
            let cfg = BeamConfig {
                beams,
                max_new_tokens: args.max_new_tokens,
                length_penalty: args.length_penalty,
                no_repeat_ngram: args.no_repeat_ngram,
                eot: tokenizer.eot(),
            };
            let ids = beam_search(&model, &tokenizer.encode(prompt), &cfg)?;
            let ids: Vec<u32> = ids
                .into_iter()
                .filter(|&t| Some(t) != tokenizer.eot())
                .collect();
            println!("{prompt}{}", tokenizer.decode(&ids));
        }
        return Ok(());
    }
    let cfg = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_at_eot: true,
        stop_strings: args.stop.clone(),
    };
    let prompts: Vec<&str> = args.prompt.iter().map(String::as_str).collect();
    for (prompt, g) in prompts
        .iter()
        .zip(generate(&model, &tokenizer, &prompts, &cfg)?)
    {
        println!("{prompt}{}", g.text);
        eprintln!("({} tokens, stopped: {:?})", g.tokens.len(), g.stopped);
    }
    Ok(())
}
