//! Everything a request reads from the config, as one immutable snapshot.
//!
//! A reload builds and validates a whole new [`LiveState`] off the request path and swaps it
//! in with one atomic store; each request loads the snapshot once, so it sees the old config
//! or the new one, never a mix. A bad file keeps the old snapshot.

use crate::auth::KeyTable;
use crate::clock::{Clock, SystemClock};
use crate::config::prices::Catalog;
use crate::config::Config;
use crate::route::health::BackendState;
use crate::route::{RouteBackend, Router};
use crate::upstream::client;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug)]
pub struct LiveState {
    pub config: Arc<Config>,
    pub keys: KeyTable,
    pub router: Router,
    pub backends: Vec<Arc<RouteBackend>>,
    /// The gateway's wall clock (budget windows, GPU hours); tests move it by hand.
    pub clock: Arc<dyn Clock>,
}

pub type Live = Arc<ArcSwap<LiveState>>;

impl LiveState {
    /// Builds a snapshot; run-time backend state (health, in-flight) is carried over by name
    /// from `previous` so a reload does not forget load or a down mark.
    pub fn build(config: Config, previous: Option<&LiveState>) -> Self {
        let clock = previous.map_or_else(
            || Arc::new(SystemClock) as Arc<dyn Clock>,
            |p| p.clock.clone(),
        );
        Self::build_with_clock(config, previous, clock)
    }

    pub fn build_with_clock(
        config: Config,
        previous: Option<&LiveState>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let old: HashMap<&str, &Arc<BackendState>> = previous
            .map(|p| {
                p.backends
                    .iter()
                    .map(|b| (&*b.cfg.name, &b.state))
                    .collect()
            })
            .unwrap_or_default();
        let backends: Vec<Arc<RouteBackend>> = config
            .backends
            .iter()
            .map(|cfg| {
                let state = old
                    .get(&*cfg.name)
                    .map(|s| Arc::clone(s))
                    .unwrap_or_else(|| {
                        Arc::new(BackendState::with_clock(cfg.name.clone(), clock.clone()))
                    });
                state.configure(&config.routing);
                state.set_cost(cfg);
                Arc::new(RouteBackend::new(cfg.clone(), client::build(cfg), state))
            })
            .collect();
        Self {
            keys: KeyTable::new(&config.teams),
            router: Router::new(&backends, &Catalog::builtin(), &config.routing),
            backends,
            config: Arc::new(config),
            clock,
        }
    }
}
