//! A tiktoken vocabulary held for counting only, in one copy.
//!
//! tiktoken-rs's `CoreBPE` keeps every token three times (encoder map, decoder map, sorted
//! list), each one a heap allocation: 14.7 MiB resident for cl100k_base, most of an idle
//! gateway's heap. Counting needs only "what is the rank of these bytes", so the vocabulary
//! is kept here as the tokens' bytes back to back, by rank, with an open-addressing index
//! over them: about 2.1 MiB for cl100k_base, 4.1 MiB for o200k_base.
//!
//! The counts are tiktoken's: the text is split with the encoding's own pattern, and a piece
//! that is not itself a token is merged pair by pair, lowest rank first (leftmost on a tie),
//! as tiktoken's byte-pair encoding does. `tests.rs` checks it against tiktoken-rs on every
//! sample and on generated text.

use tiktoken_rs::CoreBPE;

/// No pair has this rank: nothing left to merge.
const NONE: u32 = u32::MAX;

/// Pieces this long are merged with a heap instead of a scan per merge: a run of letters or
/// symbols can be as long as the prompt, and the scan is quadratic in it.
const LARGE_PIECE: usize = 256;

pub struct Vocab {
    /// Every token's bytes, by rank, back to back.
    bytes: Box<[u8]>,
    /// Where each rank's bytes start in `bytes`; one more entry than ranks.
    starts: Box<[u32]>,
    /// Open addressing from a token's bytes to its rank + 1 (0: empty slot).
    slots: Box<[u32]>,
    pattern: fancy_regex::Regex,
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vocab({} tokens)", self.starts.len() - 1)
    }
}

/// Why a vocabulary could not be built (a tiktoken-rs release that changed its tables).
#[derive(Debug, thiserror::Error)]
#[error("the tokenizer tables could not be built: {0}")]
pub struct BuildError(String);

impl Vocab {
    /// Copies the ordinary tokens (ranks `0..ranks`) out of tiktoken-rs's encoder, then lets
    /// it go. The tables kept are allocated first, on a thread of its own: the encoder's 100k+
    /// small allocations then lie above them in that thread's allocator arena, and go back to
    /// the system when they are freed (allocated after, the tables would pin the arena's top
    /// and keep most of the encoder's pages resident).
    pub fn from_tiktoken(
        load: fn() -> anyhow::Result<CoreBPE>,
        ranks: u32,
        pattern: &str,
    ) -> Result<Vocab, BuildError> {
        let pattern = fancy_regex::Regex::new(pattern).map_err(|e| BuildError(e.to_string()))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // Tokens average under 7 bytes in both encodings; more only grows the vector.
                let mut bytes = Vec::with_capacity(ranks as usize * 8);
                let mut starts = Vec::with_capacity(ranks as usize + 1);
                // At most half full: probes stay short.
                let slots = vec![0u32; (ranks as usize * 2).next_power_of_two()];
                let bpe = load().map_err(|e| BuildError(e.to_string()))?;
                for rank in 0..ranks {
                    starts.push(bytes.len() as u32);
                    // A rank the encoding skips stays empty: no piece ever maps to it.
                    if let Ok(token) = bpe.decode_bytes(&[rank]) {
                        bytes.extend_from_slice(&token);
                    }
                }
                starts.push(bytes.len() as u32);
                drop(bpe);
                Ok(Vocab::index(
                    bytes.into_boxed_slice(),
                    starts.into_boxed_slice(),
                    slots.into_boxed_slice(),
                    pattern,
                ))
            })
            .join()
            .map_err(|_| BuildError("the loading thread panicked".into()))?
        })
    }

    /// Fills `slots` (zeroed, a power of two, larger than the ranks) with every token.
    fn index(
        bytes: Box<[u8]>,
        starts: Box<[u32]>,
        mut slots: Box<[u32]>,
        pattern: fancy_regex::Regex,
    ) -> Vocab {
        let ranks = starts.len() - 1;
        let mask = slots.len() - 1;
        for rank in 0..ranks {
            let token = &bytes[starts[rank] as usize..starts[rank + 1] as usize];
            if token.is_empty() {
                continue;
            }
            let mut i = hash(token) as usize & mask;
            while slots[i] != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = rank as u32 + 1;
        }
        Vocab {
            bytes,
            starts,
            slots,
            pattern,
        }
    }

    fn token(&self, rank: u32) -> &[u8] {
        let r = rank as usize;
        &self.bytes[self.starts[r] as usize..self.starts[r + 1] as usize]
    }

    /// The rank of a token, or `NONE` when these bytes are not one.
    fn rank(&self, piece: &[u8]) -> u32 {
        let mask = self.slots.len() - 1;
        let mut i = hash(piece) as usize & mask;
        loop {
            match self.slots[i] {
                0 => return NONE,
                r if self.token(r - 1) == piece => return r - 1,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Tokens in `text` as tiktoken's `encode_ordinary` would give them.
    pub fn count(&self, text: &str) -> u64 {
        let mut n = 0;
        let mut at = 0;
        for found in self.pattern.find_iter(text) {
            match found {
                Ok(m) => {
                    n += self.count_piece(m.as_str().as_bytes());
                    at = m.end();
                }
                // The pattern gave up (its backtracking limit, on hostile text): every byte
                // left is at most one token, a bound that never undercounts.
                Err(_) => return n + (text.len() - at) as u64,
            }
        }
        n
    }

    fn count_piece(&self, piece: &[u8]) -> u64 {
        if piece.len() <= 1 || self.rank(piece) != NONE {
            return piece.len().min(1) as u64;
        }
        if piece.len() < LARGE_PIECE {
            self.merge_scanning(piece)
        } else {
            self.merge_with_heap(piece)
        }
    }

    /// The rank of the bytes from `from` to `to`, or `NONE`.
    fn span(&self, piece: &[u8], from: u32, to: u32) -> u32 {
        self.rank(&piece[from as usize..to as usize])
    }

    /// Byte-pair merging for a short piece: boundaries in a vector, each with the rank of the
    /// pair that starts there, the lowest merged until none is a token.
    fn merge_scanning(&self, piece: &[u8]) -> u64 {
        let n = piece.len() as u32;
        let mut parts: Vec<(u32, u32)> = (0..=n).map(|i| (i, NONE)).collect();
        for i in 0..parts.len() - 2 {
            parts[i].1 = self.span(piece, parts[i].0, parts[i + 2].0);
        }
        loop {
            let mut best = (NONE, 0);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < best.0 {
                    best = (rank, i);
                }
            }
            if best.0 == NONE {
                break;
            }
            let i = best.1;
            // Boundary i + 1 goes: the pair at i now ends at i + 3, the one before at i + 2.
            parts[i].1 = match parts.get(i + 3) {
                Some(&(end, _)) => self.span(piece, parts[i].0, end),
                None => NONE,
            };
            if i > 0 {
                parts[i - 1].1 = self.span(piece, parts[i - 1].0, parts[i + 2].0);
            }
            parts.remove(i + 1);
        }
        parts.len() as u64 - 1
    }

    /// The same merges for a long piece: a linked list of boundaries and a min-heap of pair
    /// ranks (stale entries skipped when popped), so each merge costs a logarithm, not a scan.
    fn merge_with_heap(&self, piece: &[u8]) -> u64 {
        use std::cmp::Reverse;
        let n = piece.len();
        // Boundary k sits before byte k; `n` is the end.
        let mut next: Vec<u32> = (1..=n as u32 + 1).collect();
        let mut prev: Vec<u32> = (0..=n as u32).map(|k| k.wrapping_sub(1)).collect();
        let mut alive = vec![true; n + 1];
        let mut rank = vec![NONE; n + 1];
        let mut heap = std::collections::BinaryHeap::with_capacity(n);
        // The rank of the pair starting at boundary k: bytes k .. next(next(k)).
        let pair = |k: u32, next: &[u32]| -> u32 {
            let m = next[k as usize];
            if m as usize >= n {
                return NONE;
            }
            self.span(piece, k, next[m as usize])
        };
        for k in 0..n.saturating_sub(1) as u32 {
            let r = pair(k, &next);
            rank[k as usize] = r;
            if r != NONE {
                heap.push(Reverse((r, k)));
            }
        }
        let mut tokens = n as u64;
        while let Some(Reverse((r, k))) = heap.pop() {
            let ku = k as usize;
            if !alive[ku] || rank[ku] != r {
                continue;
            }
            // Merge: the boundary after k goes.
            let m = next[ku] as usize;
            alive[m] = false;
            next[ku] = next[m];
            if (next[m] as usize) <= n {
                prev[next[m] as usize] = k;
            }
            tokens -= 1;
            rank[ku] = pair(k, &next);
            if rank[ku] != NONE {
                heap.push(Reverse((rank[ku], k)));
            }
            let p = prev[ku];
            if p != u32::MAX {
                let pu = p as usize;
                rank[pu] = pair(p, &next);
                if rank[pu] != NONE {
                    heap.push(Reverse((rank[pu], p)));
                }
            }
        }
        tokens
    }
}

/// A word-at-a-time multiplicative hash (FxHash's step). The table is fixed at start, so the
/// text cannot lengthen its probe chains.
fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(K);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(K);
    }
    h ^ (h >> 32)
}
