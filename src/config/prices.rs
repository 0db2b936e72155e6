//! Per-token prices: the shipped catalog (`config/prices.toml`, generated from a public price
//! list by scripts/gen_prices.py), a backend model's own price fields, or a self-hosted
//! backend's GPU rate card. Resolved once per config snapshot, so the hot path only multiplies.

use super::{Backend, BackendModel, Hosting};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

pub const BUILTIN_CATALOG: &str = include_str!("../../config/prices.toml");

/// USD per token, by kind of token.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cached_input: f64,
    /// Anthropic's 5-minute cache writes (and any provider's only kind).
    pub cache_write: f64,
    /// Anthropic's 1-hour cache writes (twice the input rate where 5 minutes cost 1.25 times).
    pub cache_write_1h: f64,
    /// Prices for the whole request once its prompt exceeds a threshold (long-context tiers).
    pub long_context: Option<(u64, Box<Price>)>,
    pub source: PriceSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceSource {
    /// The backend model's own `input_usd_per_mtok` / `output_usd_per_mtok`.
    Config,
    /// The shipped catalog, by model name.
    Catalog,
    /// A self-hosted backend's `gpu` cost spread over its expected throughput.
    GpuRateCard,
}

impl PriceSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PriceSource::Config => "config",
            PriceSource::Catalog => "catalog",
            PriceSource::GpuRateCard => "gpu_rate_card",
        }
    }
}

impl Price {
    /// The prices that apply to a request with this many prompt tokens.
    pub fn for_prompt(&self, prompt_tokens: u64) -> &Price {
        match &self.long_context {
            Some((threshold, tier)) if prompt_tokens > *threshold => tier,
            _ => self,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct Catalog {
    #[serde(default)]
    pub models: HashMap<String, CatalogModel>,
}

#[derive(Debug, Deserialize)]
pub struct CatalogModel {
    pub provider: Option<String>,
    pub mode: Option<String>,
    pub input_usd_per_mtok: Option<f64>,
    pub output_usd_per_mtok: Option<f64>,
    pub cached_input_usd_per_mtok: Option<f64>,
    pub cache_write_usd_per_mtok: Option<f64>,
    pub cache_write_1h_usd_per_mtok: Option<f64>,
    pub context_window: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub long_context: Option<LongContext>,
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct LongContext {
    pub threshold_tokens: u64,
    pub input_usd_per_mtok: Option<f64>,
    pub output_usd_per_mtok: Option<f64>,
    pub cached_input_usd_per_mtok: Option<f64>,
    pub cache_write_usd_per_mtok: Option<f64>,
}

impl Catalog {
    pub fn parse(text: &str) -> Result<Catalog, toml::de::Error> {
        toml::from_str(text)
    }

    /// The catalog shipped in the binary.
    pub fn builtin() -> Arc<Catalog> {
        static BUILTIN: OnceLock<Arc<Catalog>> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                Arc::new(
                    Catalog::parse(BUILTIN_CATALOG).expect("config/prices.toml is generated valid"),
                )
            })
            .clone()
    }

    /// Looks a model up by its name, then without a provider prefix (`mistralai/…`).
    pub fn get(&self, model: &str) -> Option<&CatalogModel> {
        self.models
            .get(model)
            .or_else(|| self.models.get(model.rsplit('/').next()?))
    }

    /// The catalog's public price for a model, whatever a backend configures for it.
    pub fn price(&self, model: &str) -> Option<Price> {
        let m = self.get(model)?;
        let input = m.input_usd_per_mtok? / 1e6;
        // Embedding models produce no output tokens; the catalog lists no output price for some.
        let embedding_output = (m.mode.as_deref() == Some("embedding")).then_some(0.0);
        let output = m.output_usd_per_mtok.or(embedding_output)? / 1e6;
        let cached_input = m.cached_input_usd_per_mtok.map_or(input, |p| p / 1e6);
        let cache_write = m.cache_write_usd_per_mtok.map_or(input, |p| p / 1e6);
        let cache_write_1h = m
            .cache_write_1h_usd_per_mtok
            .map_or(cache_write, |p| p / 1e6);
        let long_context = m.long_context.as_ref().map(|lc| {
            let tier_input = lc.input_usd_per_mtok.map_or(input, |p| p / 1e6);
            let tier = Price {
                input: tier_input,
                output: lc.output_usd_per_mtok.map_or(output, |p| p / 1e6),
                cached_input: lc
                    .cached_input_usd_per_mtok
                    .map_or(cached_input, |p| p / 1e6),
                cache_write: lc.cache_write_usd_per_mtok.map_or(cache_write, |p| p / 1e6),
                // The catalog lists no long-context 1-hour rate: the base one stands.
                cache_write_1h,
                long_context: None,
                source: PriceSource::Catalog,
            };
            (lc.threshold_tokens, Box::new(tier))
        });
        Some(Price {
            input,
            output,
            cached_input,
            cache_write,
            cache_write_1h,
            long_context,
            source: PriceSource::Catalog,
        })
    }
}

/// The price of one backend model, or `None`: served, but counted as unpriced.
pub fn resolve(backend: &Backend, model: &BackendModel, catalog: &Catalog) -> Option<Price> {
    if let (Some(i), Some(o)) = (model.input_usd_per_mtok, model.output_usd_per_mtok) {
        let catalog_cached = catalog
            .get(&model.name)
            .and_then(|m| m.cached_input_usd_per_mtok);
        let cached = model
            .cached_input_usd_per_mtok
            .or(catalog_cached)
            .unwrap_or(i);
        let catalog_write = catalog
            .get(&model.name)
            .and_then(|m| m.cache_write_usd_per_mtok);
        let write = model
            .cache_write_usd_per_mtok
            .or(catalog_write)
            .unwrap_or(i);
        let catalog_write_1h = catalog
            .get(&model.name)
            .and_then(|m| m.cache_write_1h_usd_per_mtok);
        let write_1h = model
            .cache_write_1h_usd_per_mtok
            .or(catalog_write_1h)
            .unwrap_or(write);
        return Some(Price {
            input: i / 1e6,
            output: o / 1e6,
            cached_input: cached / 1e6,
            cache_write: write / 1e6,
            cache_write_1h: write_1h / 1e6,
            long_context: None,
            source: PriceSource::Config,
        });
    }
    if backend.hosting == Hosting::SelfHosted {
        if let Some(per_token) = backend.gpu.as_ref().and_then(gpu_usd_per_token) {
            return Some(Price {
                input: per_token,
                output: per_token,
                cached_input: per_token,
                cache_write: per_token,
                cache_write_1h: per_token,
                long_context: None,
                source: PriceSource::GpuRateCard,
            });
        }
    }
    catalog.price(&model.name)
}

/// A GPU's hourly cost spread evenly over the tokens it is expected to process in that hour
/// (prompt and completion alike): `hourly_usd x count x fraction / (tokens_per_second x 3600)`.
pub fn gpu_usd_per_token(gpu: &super::GpuCost) -> Option<f64> {
    let tps = gpu.tokens_per_second?;
    Some(gpu.hourly_usd * gpu.count as f64 * gpu.fraction / (tps * 3600.0))
}
