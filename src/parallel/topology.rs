//! The one owner of every process group: the world split into DP × CP × TP with TP fastest
//! (TP ranks are neighbours, i.e. within a node), then CP, then DP:
//! `world_rank = tp_rank + tp · (cp_rank + cp · dp_rank)`.
//!
//! Groups: `tp` (same cp, dp), `cp` (same tp, dp: the ring), `dp` (same tp, cp) and `dpcp` (same
//! tp: the ranks that hold the same weight shard and reduce gradients together — CP ranks hold the
//! same weights as DP ranks do).

use anyhow::{Result, bail};

use crate::model::config::ModelConfig;
use crate::model::params::Shard;
use crate::parallel::any::AnyComm;
use crate::parallel::comm::{Comm, SelfComm};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub tp: usize,
    pub cp: usize,
    pub dp: usize,
}

impl Layout {
    /// `dp = world / (tp · cp)`, or an error saying why the world does not factor.
    pub fn of_world(world: usize, tp: usize, cp: usize) -> Result<Layout> {
        if tp == 0 || cp == 0 {
            bail!("tp and cp must be at least 1 (got tp {tp}, cp {cp})");
        }
        if !world.is_multiple_of(tp * cp) {
            bail!(
                "{world} ranks do not factor into tp {tp} × cp {cp} × dp: the world size must be a multiple of tp·cp = {}",
                tp * cp
            );
        }
        Ok(Layout {
            tp,
            cp,
            dp: world / (tp * cp),
        })
    }

    pub fn world(&self) -> usize {
        self.tp * self.cp * self.dp
    }

    /// (tp_rank, cp_rank, dp_rank) of a world rank.
    pub fn coords(&self, world_rank: usize) -> (usize, usize, usize) {
        (
            world_rank % self.tp,
            (world_rank / self.tp) % self.cp,
            world_rank / (self.tp * self.cp),
        )
    }

    /// The model must split evenly over `tp`: TP ≤ KV heads, heads, KV heads, FFN width and
    /// vocabulary divisible by tp.
    pub fn check_model(&self, cfg: &ModelConfig) -> Result<()> {
        let tp = self.tp;
        if tp > cfg.num_key_value_heads {
            bail!(
                "tp {tp} exceeds num_key_value_heads {}: each TP rank must hold at least one KV head",
                cfg.num_key_value_heads
            );
        }
        for (what, n) in [
            ("num_attention_heads", cfg.num_attention_heads),
            ("num_key_value_heads", cfg.num_key_value_heads),
            ("intermediate_size", cfg.intermediate_size),
            ("vocab_size", cfg.vocab_size),
        ] {
            if n % tp != 0 {
                bail!("{what} {n} does not divide by tp {tp}");
            }
        }
        Ok(())
    }

    /// A sequence splits into 2·cp zigzag chunks, each split again over tp (sequence parallel):
    /// the length must be a multiple of 2·cp·tp (checked whenever more than one rank shares a
    /// sequence); never truncated silently.
    pub fn check_seq_len(&self, seq_len: usize) -> Result<()> {
        let m = 2 * self.cp * self.tp;
        if self.cp * self.tp > 1 && !seq_len.is_multiple_of(m) {
            bail!(
                "seq_len {seq_len} is not a multiple of 2·cp·tp = {m} (cp {}, tp {}): the zigzag layout needs 2·cp equal chunks, each split over tp",
                self.cp,
                self.tp
            );
        }
        Ok(())
    }
}

/// Every communicator of this rank, and where it sits.
pub struct Topology {
    pub layout: Layout,
    pub world_rank: usize,
    pub tp_rank: usize,
    pub cp_rank: usize,
    pub dp_rank: usize,
    pub world: AnyComm,
    pub tp: AnyComm,
    pub cp: AnyComm,
    pub dp: AnyComm,
    pub dpcp: AnyComm,
}

impl Topology {
    /// Split `world` into the groups of `(tp, cp)`; collective over the world (which is
    /// duplicated, so the topology owns all of its communicators).
    pub fn new(world: &AnyComm, tp: usize, cp: usize) -> Result<Topology> {
        let layout = Layout::of_world(world.size(), tp, cp)?;
        let r = world.rank();
        let (t, c, d) = layout.coords(r);
        let tpc = world.split(c + cp * d, t);
        let cpc = world.split(t + tp * d, c);
        let dpc = world.split(t + tp * c, d);
        let dpcp = world.split(t, c + cp * d);
        let world = world.split(0, r);
        Ok(Topology {
            layout,
            world_rank: r,
            tp_rank: t,
            cp_rank: c,
            dp_rank: d,
            world,
            tp: tpc,
            cp: cpc,
            dp: dpc,
            dpcp,
        })
    }

    /// One rank, no MPI.
    pub fn single() -> Topology {
        let one = || AnyComm::Single(SelfComm::default());
        Topology {
            layout: Layout {
                tp: 1,
                cp: 1,
                dp: 1,
            },
            world_rank: 0,
            tp_rank: 0,
            cp_rank: 0,
            dp_rank: 0,
            world: one(),
            tp: one(),
            cp: one(),
            dp: one(),
            dpcp: one(),
        }
    }

    /// The weight shard this rank holds.
    pub fn shard(&self) -> Shard {
        Shard {
            rank: self.tp_rank,
            size: self.layout.tp,
        }
    }

    /// Rank of the DP × CP group (the ZeRO shard index).
    pub fn dpcp_rank(&self) -> usize {
        self.cp_rank + self.layout.cp * self.dp_rank
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tp_is_fastest_and_every_rank_has_unique_coords() {
        let l = Layout::of_world(24, 2, 3).unwrap();
        assert_eq!(l.dp, 4);
        assert_eq!(l.coords(0), (0, 0, 0));
        assert_eq!(l.coords(1), (1, 0, 0));
        assert_eq!(l.coords(2), (0, 1, 0));
        assert_eq!(l.coords(6), (0, 0, 1));
        assert_eq!(l.coords(23), (1, 2, 3));
        let mut seen: Vec<_> = (0..24).map(|r| l.coords(r)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 24);
    }

    #[test]
    fn bad_layouts_are_refused_with_the_reason() {
        let e = Layout::of_world(6, 4, 1).unwrap_err().to_string();
        assert!(e.contains("do not factor"), "{e}");
        let cfg = ModelConfig::from_json_str(
            r#"{"vocab_size": 384, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1,
                "num_attention_heads": 6, "num_key_value_heads": 2}"#,
            "t",
        )
        .unwrap();
        let l4 = Layout {
            tp: 4,
            cp: 1,
            dp: 1,
        };
        let e = l4.check_model(&cfg).unwrap_err().to_string();
        assert!(e.contains("exceeds num_key_value_heads 2"), "{e}");
        let l2 = Layout {
            tp: 2,
            cp: 1,
            dp: 1,
        };
        l2.check_model(&cfg).unwrap();
        let l2c = Layout {
            tp: 2,
            cp: 2,
            dp: 1,
        };
        assert!(l2c.check_seq_len(24).is_ok());
        let e = l2c.check_seq_len(20).unwrap_err().to_string();
        assert!(e.contains("multiple of 2·cp·tp = 8"), "{e}");
        assert!(
            Layout {
                tp: 1,
                cp: 1,
                dp: 4
            }
            .check_seq_len(7)
            .is_ok()
        );
    }
}
