//! What a model's chat template adds to a prompt, learned from the engine's own counts.
//!
//! An engine that reports a prompt's tokens (in `usage`) counts the rendered template: the
//! role markers, the separators, a default system prompt some templates insert. An engine
//! that can tokenize text but not render its template (llama-cpp-python) can still count the
//! messages' contents exactly; the difference between the two is the template's overhead for
//! that shape of conversation. It is learned from every answer that carried usage, and added
//! to the contents' count of answers that did not.
//!
//! The overhead depends on the shape: how many messages, and whether the caller sent a system
//! message (templates like SmolLM2's insert their own default one otherwise). An exact shape
//! seen before gives the exact overhead; another message count is extrapolated from the
//! per-message step between two learned shapes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The shape of a chat prompt, as far as its template's overhead goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    pub messages: u32,
    pub system: bool,
}

/// Learned overheads per model; shared by the requests to one backend.
#[derive(Debug, Default)]
pub struct TemplateMemory {
    learned: Mutex<HashMap<(Arc<str>, Shape), u64>>,
    /// Tokens an engine adds to any text it tokenizes (a BOS), per model.
    text_offset: Mutex<HashMap<Arc<str>, u64>>,
}

impl TemplateMemory {
    pub fn knows(&self, model: &Arc<str>, shape: Shape) -> bool {
        self.lock().contains_key(&(model.clone(), shape))
    }

    /// Remembers that `shape` costs `engine_prompt` tokens when its contents are `contents`.
    pub fn learn(&self, model: &Arc<str>, shape: Shape, contents: u64, engine_prompt: u64) {
        let Some(overhead) = engine_prompt.checked_sub(contents) else {
            // The engine counted fewer tokens than its own contents' count: not a template.
            return;
        };
        self.lock().insert((model.clone(), shape), overhead);
    }

    /// The overhead of `shape`: exact when seen, else extrapolated along the message count
    /// from the same kind of prompt (with or without a system message); `None` when nothing
    /// of that kind was learned yet.
    pub fn overhead(&self, model: &Arc<str>, shape: Shape) -> Option<u64> {
        let learned = self.lock();
        if let Some(&o) = learned.get(&(model.clone(), shape)) {
            return Some(o);
        }
        let kind = |system: bool| {
            let mut v: Vec<(u32, u64)> = learned
                .iter()
                .filter(|((m, s), _)| m == model && s.system == system)
                .map(|((_, s), &o)| (s.messages, o))
                .collect();
            v.sort_unstable();
            v
        };
        let same = kind(shape.system);
        let nearest = same
            .iter()
            .min_by_key(|(n, _)| n.abs_diff(shape.messages))
            .copied()?;
        let step_of = |v: &[(u32, u64)]| match (v.first(), v.last()) {
            (Some(&(n0, o0)), Some(&(n1, o1))) if n1 > n0 => {
                Some((o1 as f64 - o0 as f64) / f64::from(n1 - n0))
            }
            _ => None,
        };
        // The step a message adds is the template's, whatever the first message: learned from
        // the other kind of prompt when this kind has one shape only. With none, the nearest
        // shape's overhead stands.
        let step = step_of(&same)
            .or_else(|| step_of(&kind(!shape.system)))
            .unwrap_or(0.0);
        let delta = f64::from(shape.messages) - f64::from(nearest.0);
        Some((nearest.1 as f64 + step * delta).round().max(0.0) as u64)
    }

    pub fn text_offset(&self, model: &Arc<str>) -> Option<u64> {
        self.text_offset
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .copied()
    }

    pub fn set_text_offset(&self, model: &Arc<str>, n: u64) {
        self.text_offset
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.clone(), n);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Arc<str>, Shape), u64>> {
        // Only plain inserts happen under the lock: a panic elsewhere cannot corrupt it.
        self.learned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(messages: u32, system: bool) -> Shape {
        Shape { messages, system }
    }

    #[test]
    fn exact_shapes_are_exact_and_others_follow_the_step() {
        let m: Arc<str> = "smollm2".into();
        let mem = TemplateMemory::default();
        assert_eq!(mem.overhead(&m, shape(1, false)), None);
        mem.learn(&m, shape(1, false), 4, 37);
        assert_eq!(mem.overhead(&m, shape(1, false)), Some(33));
        assert_eq!(
            mem.overhead(&m, shape(3, false)),
            Some(33),
            "no step known yet"
        );
        assert_eq!(
            mem.overhead(&m, shape(1, true)),
            None,
            "another kind of prompt"
        );
        mem.learn(&m, shape(2, false), 9, 47);
        assert_eq!(mem.overhead(&m, shape(2, false)), Some(38));
        assert_eq!(mem.overhead(&m, shape(4, false)), Some(48), "5 a message");
        assert_eq!(mem.overhead(&"other".into(), shape(1, false)), None);
        // A prompt with a system message: its own base, the step learned without one.
        mem.learn(&m, shape(2, true), 9, 19);
        assert_eq!(mem.overhead(&m, shape(4, true)), Some(20));
    }

    #[test]
    fn a_count_below_the_contents_is_not_learned() {
        let m: Arc<str> = "m".into();
        let mem = TemplateMemory::default();
        mem.learn(&m, shape(1, true), 40, 30);
        assert!(!mem.knows(&m, shape(1, true)));
    }
}
