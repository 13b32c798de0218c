//! [`HostAdapter`]: one adapter's A, B and scales read back to the host and checked against the
//! shape of a bank's model, ready to be written into the bank's stacks.
//!
//! Made apart from the bank, on any thread, so that a server can read and check an adapter file
//! while its model keeps decoding, and hand the bank only weights that fit: the insertion then
//! only copies them into one slot ([`crate::AdapterBank::insert_host`]).

use transformer::GptConfig;

use crate::config::BiasMode;
use crate::error::{Error, Result};
use crate::model::{LoraModel, site_name};
use crate::target::Target;

/// One site of one adapter, on the host: A (r, in) and B (width, r) row-major.
pub(super) struct HostSite {
    pub layer: usize,
    pub target: Target,
    pub r: usize,
    pub scale: f32,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// An adapter's weights on the host, checked for a bank over a model of `n_layer` layers of
/// width `n_embd`; a `c_attn` site that is q, k and v sites in one (as PEFT's files hold a q/v
/// adapter) split back into them. Plain data: it may cross threads.
pub struct HostAdapter {
    pub(super) name: String,
    /// (n_layer, n_embd) of the model it was checked against.
    pub(super) shape: (usize, usize),
    pub(super) sites: Vec<HostSite>,
}

impl HostAdapter {
    /// Copies `lora`'s A and B to the host as adapter `name` (later changes to `lora` do not
    /// reach it), after the checks a bank makes: unmerged (the bank adds every adapter's term to
    /// the unmerged base), no biases and nothing but A and B (a bank shares the base's
    /// parameters between all rows), every site fitting a model of `config`'s shape.
    pub fn new(name: &str, lora: &LoraModel, config: &GptConfig) -> Result<HostAdapter> {
        if lora.is_merged() {
            return Err(Error::State(format!(
                "adapter `{name}` is merged into a model's weights: unmerge it first (the bank \
                 adds every adapter's term to the unmerged base)"
            )));
        }
        if !lora.eval_only().is_empty() {
            return Err(Error::config(format!(
                "adapter `{name}` holds {}: a bank serves plain LoRA (A and B) over a shared base; \
                 evaluate or merge this adapter on its own model instead",
                lora.eval_only().join(", ")
            )));
        }
        if lora.config.bias != BiasMode::None {
            return Err(Error::config(format!(
                "adapter `{name}` trains biases (bias mode `{}`); a bank serves A and B only, \
                 since the biases are the base model's, shared by every sequence",
                lora.config.bias.name()
            )));
        }
        let (n_layer, c) = (config.n_layer, config.n_embd);
        let mut sites = Vec::new();
        for (site, l) in lora.sites() {
            let (col0, width) = site.target.columns(config);
            let fits = site.layer < n_layer
                && l.in_features() == site.target.module().shape(config).0
                && (l.col0, l.width()) == (col0, width)
                && l.a.value().shape() == [l.r(), l.in_features()]
                && l.b.value().shape() == [width, l.r()];
            if !fits {
                return Err(Error::mismatch(
                    None,
                    format!(
                        "adapter `{name}`, {}: A is {:?} and B {:?}, which do not fit a model \
                         of {n_layer} layers and width {c}",
                        site_name(site),
                        l.a.value().shape(),
                        l.b.value().shape(),
                    ),
                ));
            }
            let host = HostSite {
                layer: site.layer,
                target: site.target,
                r: l.r(),
                scale: l.scale,
                a: l.a.value().to_vec()?,
                b: l.b.value().to_vec()?,
            };
            match site.target {
                Target::CAttn => sites.extend(split_c_attn(host, c)),
                _ => sites.push(host),
            }
        }
        Ok(HostAdapter {
            name: name.to_string(),
            shape: (n_layer, c),
            sites,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of its A and B as the bank holds them (a `c_attn` LoRA that is q, k, v LoRAs in
    /// one, as PEFT saves them, split back, see `split_c_attn`): what it adds to a bank,
    /// beyond the padding to a site's largest rank and the free slots of a stack's capacity.
    pub fn bytes(&self) -> u64 {
        self.sites
            .iter()
            .map(|s| 4 * (s.a.len() + s.b.len()) as u64)
            .sum()
    }
}

/// A `c_attn` site whose rank components each feed one column block only (q, k or v), as one
/// site per block of the components feeding it; any other site as it is.
///
/// PEFT sees only the fused `c_attn`, so a q/v adapter of rank r is saved (`peft_save.rs`), and
/// read back, as one `c_attn` LoRA of rank 2r with B block-diagonal: A = [A_q; A_v], B's q rows
/// nonzero in the first r columns only, its v rows in the last r, its k rows zero. Served as it
/// is, it would cost twice its weights (and twice the work). Split, component k of block β
/// keeps its A row and its B column restricted to β's rows, with the same scale s:
///
/// ```text
/// y[j] = Σ_k B[j,k]·h[k],  h = s·A·x     j in block β: only β's components have B[j,k] ≠ 0
/// ```
///
/// so every output is the same sum of the same nonzero terms in the same (ascending) order,
/// less terms 0·h[k] = 0 (x finite): the same numbers. A column of B that is all zero feeds
/// nothing and is dropped.
fn split_c_attn(site: HostSite, c: usize) -> Vec<HostSite> {
    let r = site.r;
    // The column block (0: q, 1: k, 2: v) each rank component feeds; None: none.
    let mut owner: Vec<Option<usize>> = vec![None; r];
    for (j, row) in site.b.chunks(r).enumerate() {
        for (k, &v) in row.iter().enumerate() {
            if v != 0.0 {
                match owner[k] {
                    None => owner[k] = Some(j / c),
                    Some(block) if block == j / c => {}
                    Some(_) => return vec![site], // a component feeds two blocks
                }
            }
        }
    }
    if owner.iter().all(Option::is_none) {
        return vec![site]; // B is zero (an untrained adapter): nothing to split by
    }
    let n_in = site.a.len() / r;
    let mut out = Vec::new();
    for (block, target) in [Target::Q, Target::K, Target::V].into_iter().enumerate() {
        let ks: Vec<usize> = (0..r).filter(|&k| owner[k] == Some(block)).collect();
        if ks.is_empty() {
            continue;
        }
        let a = ks
            .iter()
            .flat_map(|&k| site.a[k * n_in..(k + 1) * n_in].iter().copied())
            .collect();
        let b = (block * c..(block + 1) * c)
            .flat_map(|j| ks.iter().map(move |&k| (j, k)))
            .map(|(j, k)| site.b[j * r + k])
            .collect();
        out.push(HostSite {
            layer: site.layer,
            target,
            r: ks.len(),
            scale: site.scale,
            a,
            b,
        });
    }
    out
}
