//! Which GPU a rank drives: its rank among the ranks of its node (the "local rank"), as the
//! launcher reports it, checked against the GPUs the node shows. One GPU per local rank: a node
//! with more ranks than GPUs is an error naming both counts, unless sharing is asked for
//! (`ULTRALONG_SHARE_GPU=1`: the tests and bench/gpu-check.sh run several ranks on one GPU).
//!
//! Environment, first match wins:
//! - `ULTRALONG_DEVICE=N`: use GPU N, whatever the launcher says (e.g. when the launcher binds one
//!   GPU per task, `srun --gpus-per-task=1`, so every rank sees its own GPU as device 0);
//! - `ULTRALONG_LOCAL_RANK` (and `ULTRALONG_LOCAL_SIZE`): an explicit local rank, for launchers
//!   not listed here;
//! - OpenMPI's `OMPI_COMM_WORLD_LOCAL_RANK` / `_LOCAL_SIZE` (mpirun, also inside a Slurm
//!   allocation, where the batch shell's Slurm variables are not the ranks');
//! - Slurm's `SLURM_LOCALID`, with the ranks of this node from `SLURM_STEP_TASKS_PER_NODE`
//!   (e.g. `8(x32)` or `8,7`, indexed by `SLURM_NODEID`) or `SLURM_NTASKS_PER_NODE`;
//! - MPICH/Hydra's `MPI_LOCALRANKID` / `MPI_LOCALNRANKS`;
//! - none of them: one process, local rank 0.
//!
//! Kept apart from the CUDA backend so that it builds, and is tested, without the `cuda` feature.

use anyhow::{Context, Result, bail};

/// This process's place among the ranks of its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRank {
    pub rank: usize,
    /// Ranks on this node, when the launcher says.
    pub size: Option<usize>,
    /// The variable the rank came from (for messages).
    pub source: &'static str,
}

/// (rank variable, size variable) per launcher, in the order they are tried. Slurm's size is
/// worked out separately (`slurm_tasks_on_node`).
const LAUNCHERS: [(&str, Option<&str>); 4] = [
    ("ULTRALONG_LOCAL_RANK", Some("ULTRALONG_LOCAL_SIZE")),
    (
        "OMPI_COMM_WORLD_LOCAL_RANK",
        Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
    ),
    ("SLURM_LOCALID", None),
    ("MPI_LOCALRANKID", Some("MPI_LOCALNRANKS")),
];

fn parse_count(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Result<Option<usize>> {
    match env(var) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .with_context(|| format!("{var}={v:?}: expected a non-negative integer")),
    }
}

/// Ranks on node `node` from Slurm's compressed per-node task counts: `8(x32)`, `8,7`,
/// `2(x3),1` — each item a count, repeated `xN` times, listed in node order.
pub fn slurm_tasks_on_node(spec: &str, node: usize) -> Result<usize> {
    let mut seen = 0usize;
    for item in spec.split(',') {
        let item = item.trim();
        let (count, repeat) = match item.split_once('(') {
            Some((c, rest)) => {
                let n = rest
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .with_context(|| format!("tasks per node {spec:?}: bad item {item:?}"))?;
                (c, n.parse::<usize>().ok())
            }
            None => (item, Some(1)),
        };
        let count: usize = count
            .parse()
            .ok()
            .with_context(|| format!("tasks per node {spec:?}: bad item {item:?}"))?;
        let repeat =
            repeat.with_context(|| format!("tasks per node {spec:?}: bad item {item:?}"))?;
        if node < seen + repeat {
            return Ok(count);
        }
        seen += repeat;
    }
    bail!("tasks per node {spec:?} lists {seen} nodes, but this is node {node}")
}

/// The local rank from an environment (a function, so tests need not touch the process's).
pub fn local_rank_from(env: &dyn Fn(&str) -> Option<String>) -> Result<LocalRank> {
    for (rank_var, size_var) in LAUNCHERS {
        let Some(rank) = parse_count(env, rank_var)? else {
            continue;
        };
        let size = match size_var {
            Some(v) => parse_count(env, v)?,
            None => {
                // Slurm: the step's own counts (an srun step), else the job's.
                let node = parse_count(env, "SLURM_NODEID")?.unwrap_or(0);
                match ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"]
                    .iter()
                    .find_map(|v| env(v).map(|s| (*v, s)))
                {
                    Some((v, spec)) => {
                        Some(slurm_tasks_on_node(&spec, node).with_context(|| v.to_string())?)
                    }
                    None => parse_count(env, "SLURM_NTASKS_PER_NODE")?,
                }
            }
        };
        if let Some(n) = size
            && rank >= n
        {
            bail!("{rank_var}={rank} but the launcher reports {n} ranks on this node");
        }
        return Ok(LocalRank {
            rank,
            size,
            source: rank_var,
        });
    }
    Ok(LocalRank {
        rank: 0,
        size: None,
        source: "no launcher (one process)",
    })
}

/// The GPU (ordinal among the `visible` ones) for `local`: `explicit` if given, else its local
/// rank. More ranks on the node than GPUs is an error, unless `share` (then rank mod GPUs).
pub fn choose_device(
    local: &LocalRank,
    visible: usize,
    explicit: Option<usize>,
    share: bool,
) -> Result<usize> {
    if visible == 0 {
        bail!("--backend cuda: the driver reports no CUDA device (CUDA_VISIBLE_DEVICES?)");
    }
    if let Some(d) = explicit {
        if d >= visible {
            bail!("ULTRALONG_DEVICE={d}, but this node shows {visible} GPU(s) (0..{visible})");
        }
        return Ok(d);
    }
    let ranks = local.size.unwrap_or(local.rank + 1);
    if ranks > visible {
        if share {
            return Ok(local.rank % visible);
        }
        bail!(
            "{ranks} ranks on this node ({}) but {visible} GPU(s) visible: one GPU per rank; \
             start fewer ranks per node, or set ULTRALONG_DEVICE=N when the launcher gives each \
             rank its own GPU, or ULTRALONG_SHARE_GPU=1 to let ranks share (tests only)",
            match local.size {
                Some(_) => local.source.to_string(),
                None => format!("{}={}", local.source, local.rank),
            }
        );
    }
    Ok(local.rank)
}

/// `choose_device` for this process, from its environment and `visible` GPUs.
pub fn device_for_this_rank(visible: usize) -> Result<usize> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let local = local_rank_from(&env)?;
    let explicit = parse_count(&env, "ULTRALONG_DEVICE")?;
    let share = env("ULTRALONG_SHARE_GPU").is_some_and(|v| v != "0");
    choose_device(&local, visible, explicit, share)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| m.get(k).cloned()
    }

    fn local(pairs: &[(&str, &str)]) -> Result<LocalRank> {
        local_rank_from(&env_of(pairs))
    }

    #[test]
    fn slurm_task_counts_expand_by_node() {
        assert_eq!(slurm_tasks_on_node("8(x32)", 0).unwrap(), 8);
        assert_eq!(slurm_tasks_on_node("8(x32)", 31).unwrap(), 8);
        assert!(slurm_tasks_on_node("8(x32)", 32).is_err());
        assert_eq!(slurm_tasks_on_node("8,7", 1).unwrap(), 7);
        assert_eq!(slurm_tasks_on_node("2(x3),1", 2).unwrap(), 2);
        assert_eq!(slurm_tasks_on_node("2(x3),1", 3).unwrap(), 1);
        assert!(slurm_tasks_on_node("8(y2)", 0).is_err());
        assert!(slurm_tasks_on_node("", 0).is_err());
    }

    #[test]
    fn each_launcher_is_read() {
        let l = local(&[
            ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "8"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.size), (3, Some(8)));
        let l = local(&[
            ("SLURM_LOCALID", "5"),
            ("SLURM_NODEID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "8,6"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.size, l.source), (5, Some(6), "SLURM_LOCALID"));
        let l = local(&[("SLURM_LOCALID", "2"), ("SLURM_NTASKS_PER_NODE", "4")]).unwrap();
        assert_eq!((l.rank, l.size), (2, Some(4)));
        let l = local(&[("MPI_LOCALRANKID", "1"), ("MPI_LOCALNRANKS", "2")]).unwrap();
        assert_eq!((l.rank, l.size), (1, Some(2)));
        let l = local(&[]).unwrap();
        assert_eq!((l.rank, l.size), (0, None));
    }

    #[test]
    fn openmpi_wins_over_the_batch_shells_slurm_variables() {
        // mpirun inside an allocation: the ranks inherit the batch shell's SLURM_LOCALID=0.
        let l = local(&[
            ("SLURM_LOCALID", "0"),
            ("SLURM_TASKS_PER_NODE", "8(x2)"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "6"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "8"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.source), (6, "OMPI_COMM_WORLD_LOCAL_RANK"));
        let l = local(&[
            ("ULTRALONG_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "6"),
        ])
        .unwrap();
        assert_eq!((l.rank, l.size), (1, None));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = format!("{:#}", local(&[("SLURM_LOCALID", "x")]).unwrap_err());
        assert!(e.contains("SLURM_LOCALID") && e.contains("\"x\""), "{e}");
        let e = format!(
            "{:#}",
            local(&[
                ("OMPI_COMM_WORLD_LOCAL_RANK", "8"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "8")
            ])
            .unwrap_err()
        );
        assert!(e.contains("8 ranks on this node"), "{e}");
        let e = format!(
            "{:#}",
            local(&[
                ("SLURM_LOCALID", "0"),
                ("SLURM_STEP_TASKS_PER_NODE", "8(z)")
            ])
            .unwrap_err()
        );
        assert!(e.contains("SLURM_STEP_TASKS_PER_NODE"), "{e}");
    }

    #[test]
    fn one_gpu_per_local_rank() {
        let l = |rank, size| LocalRank {
            rank,
            size,
            source: "SLURM_LOCALID",
        };
        assert_eq!(choose_device(&l(5, Some(8)), 8, None, false).unwrap(), 5);
        assert_eq!(choose_device(&l(0, None), 1, None, false).unwrap(), 0);
        // Fewer GPUs than ranks: one line with both counts.
        let e = choose_device(&l(1, Some(8)), 4, None, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("8 ranks on this node") && e.contains("4 GPU(s) visible"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        // Without a size, a rank beyond the GPUs is the same error.
        let e = choose_device(&l(2, None), 2, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 ranks") && e.contains("2 GPU(s)"), "{e}");
        // Sharing asked for: rank mod GPUs.
        assert_eq!(choose_device(&l(5, Some(8)), 2, None, true).unwrap(), 1);
        // An explicit device wins, and must exist.
        assert_eq!(choose_device(&l(5, Some(8)), 1, Some(0), false).unwrap(), 0);
        assert!(choose_device(&l(0, None), 2, Some(2), false).is_err());
        assert!(choose_device(&l(0, None), 0, None, true).is_err());
    }
}
