//! The optimizer: AdamW (the per-element update is the backend's `adamw` kernel), global-norm
//! clipping, and `ShardedAdamW`, the ZeRO-1 optimizer training uses: fp32 master weights and both
//! moments exist only for this rank's slice of the DP × CP partition (`parallel::zero`).
//!
//! Per step: the gradients are reduced and scattered (rank `k` receives the sum of slice `k`), the
//! global norm is taken over all slices, AdamW updates the slice with the clip factor folded into
//! its gradient scale, and the updated slices are gathered back into every rank's weights. With
//! one rank this is `adamw_step` after `clip_factor`, tensor by tensor.

use crate::backend::{AdamW, Backend};
use crate::model::params::ParamStore;
use crate::parallel::topology::Topology;
use crate::parallel::zero::Partition;

/// Clip factor for a global norm (`max_norm` 0 = no clipping), as torch's clip_grad_norm_.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// The hyper-parameters of one tensor: norm weights are not weight-decayed.
fn for_tensor(hp: AdamW, is_norm: bool) -> AdamW {
    AdamW {
        weight_decay: if is_norm { 0.0 } else { hp.weight_decay },
        ..hp
    }
}

/// One unsharded optimizer step over all parameters, in place (no master copy, no clipping): the
/// single-device path of `bench train` and `gpu-check`.
pub fn adamw_step<B: Backend>(
    b: &B,
    params: &mut ParamStore<B>,
    grads: &ParamStore<B>,
    m: &mut ParamStore<B>,
    v: &mut ParamStore<B>,
    hp: AdamW,
) {
    for i in 0..params.bufs.len() {
        b.adamw(
            &mut params.bufs[i],
            &grads.bufs[i],
            &mut m.bufs[i],
            &mut v.bufs[i],
            &for_tensor(hp, params.specs[i].is_norm),
        );
    }
}

/// AdamW with ZeRO-1 sharded state (see the module comment): per segment of this rank's slice,
/// its fp32 master weights, moments and reduced gradient.
pub struct ShardedAdamW<B: Backend> {
    part: Partition,
    /// Weight-decayed (not a norm weight), per segment.
    decay: Vec<bool>,
    master: Vec<B::Buf>,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    grad: Vec<B::Buf>,
}

impl<B: Backend> ShardedAdamW<B> {
    /// State for `params` (this rank's TP shard): master weights copied from them, zero moments.
    pub fn new(b: &B, topo: &Topology, params: &ParamStore<B>) -> Self {
        let part = Partition::of_rank(topo, &params.specs);
        let segs = part.segments();
        let zeros = || segs.iter().map(|s| b.zeros(s.len)).collect::<Vec<_>>();
        let mut master = zeros();
        for (s, buf) in segs.iter().zip(&mut master) {
            b.copy(&params.bufs[s.param], s.off, buf, 0, s.len);
        }
        ShardedAdamW {
            decay: segs
                .iter()
                .map(|s| !params.specs[s.param].is_norm)
                .collect(),
            master,
            m: zeros(),
            v: zeros(),
            grad: zeros(),
            part,
        }
    }

    /// Reduce `grads` (summed over this rank's sequences, already scaled by 1 / global target
    /// count), clip to `max_norm` (0 = off) and update `params`. Returns the global gradient norm
    /// before clipping. `grads` is left holding partial results (zero it before the next step).
    pub fn step(
        &mut self,
        b: &B,
        topo: &Topology,
        params: &mut ParamStore<B>,
        grads: &mut ParamStore<B>,
        hp: AdamW,
        max_norm: f64,
    ) -> f64 {
        self.part.reduce_scatter(b, topo, grads, &mut self.grad);
        let norm = self.part.norm(b, topo, &self.grad);
        let hp = AdamW {
            grad_scale: hp.grad_scale * clip_factor(norm, max_norm),
            ..hp
        };
        for k in 0..self.master.len() {
            b.adamw(
                &mut self.master[k],
                &self.grad[k],
                &mut self.m[k],
                &mut self.v[k],
                &for_tensor(hp, !self.decay[k]),
            );
        }
        self.part.all_gather(b, topo, &self.master, params);
        norm
    }

    /// Elements this rank's slice really holds.
    pub fn held(&self) -> usize {
        self.part.held()
    }

    /// The slice's master weights, first and second moments, flat, in f32 (checkpoints).
    pub fn export_slice(&self, b: &B) -> [Vec<f32>; 3] {
        let flat = |bufs: &[B::Buf]| bufs.iter().flat_map(|x| b.download(x)).collect();
        [flat(&self.master), flat(&self.m), flat(&self.v)]
    }

    /// Restore the slice from `export_slice`'s vectors (same layout).
    pub fn import_slice(&mut self, b: &B, master: &[f32], m: &[f32], v: &[f32]) {
        for (k, s) in self.part.segments().iter().enumerate() {
            let r = s.at..s.at + s.len;
            self.master[k] = b.upload(&master[r.clone()]);
            self.m[k] = b.upload(&m[r.clone()]);
            self.v[k] = b.upload(&v[r]);
        }
    }

    /// Restore from stores shaped like the local parameters (a checkpoint resharded by the caller
    /// to this TP rank): master weights and both moments.
    pub fn set_state(
        &mut self,
        b: &B,
        master: &ParamStore<B>,
        m: &ParamStore<B>,
        v: &ParamStore<B>,
    ) {
        for (k, s) in self.part.segments().iter().enumerate() {
            b.copy(&master.bufs[s.param], s.off, &mut self.master[k], 0, s.len);
            b.copy(&m.bufs[s.param], s.off, &mut self.m[k], 0, s.len);
            b.copy(&v.bufs[s.param], s.off, &mut self.v[k], 0, s.len);
        }
    }
}

#[cfg(test)]
mod tests {
    //! `ShardedAdamW` against AdamW and clipping written out here on the host in f64 (group 1),
    //! and the sharded runs (groups 2 and 3, ranks as threads) against group 1.
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::config::ModelConfig;
    use crate::parallel::any::AnyComm;
    use crate::parallel::thread::ThreadComm;
    use crate::util::gradcheck::test_values;

    const STEPS: usize = 3;

    /// Per tensor, its values.
    type Tensors = Vec<Vec<f64>>;
    /// The parameters after each step, and the gradient norm of each step.
    type Run = (Vec<Tensors>, Vec<f64>);

    fn cfg() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 1, "initializer_range": 0.3}"#,
            "tiny",
        )
        .unwrap()
    }

    fn hp(step: usize) -> AdamW {
        AdamW {
            lr: 1e-2 * step as f64,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: step as u64,
            grad_scale: 0.5,
        }
    }

    /// The full gradient of each step, per tensor: step 1 large (clipped), later ones small.
    fn grads(sizes: &[usize]) -> Vec<Tensors> {
        (0..STEPS)
            .map(|t| {
                let scale = if t == 0 { 1.0 } else { 1e-3 };
                sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        test_values(n, (10 * t + i) as u64)
                            .iter()
                            .map(|x| x * scale)
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    fn norm(g: &[Vec<f64>]) -> f64 {
        g.iter().flatten().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// torch.optim.AdamW after clip_grad_norm_, per element in f64; norm weights not decayed.
    /// Returns the parameters after each step and the norms before clipping.
    fn reference(p0: &[Vec<f64>], is_norm: &[bool], grads: &[Tensors], max_norm: f64) -> Run {
        let mut p = p0.to_vec();
        let mut m: Vec<Vec<f64>> = p0.iter().map(|x| vec![0.0; x.len()]).collect();
        let mut v = m.clone();
        let (mut after, mut norms) = (Vec::new(), Vec::new());
        for (t, g) in grads.iter().enumerate() {
            let h = hp(t + 1);
            let n = norm(g);
            let clip = if n > max_norm {
                max_norm / (n + 1e-6)
            } else {
                1.0
            };
            norms.push(n);
            for i in 0..p.len() {
                let wd = if is_norm[i] { 0.0 } else { h.weight_decay };
                for e in 0..p[i].len() {
                    let gi = g[i][e] * clip * h.grad_scale;
                    m[i][e] = h.beta1 * m[i][e] + (1.0 - h.beta1) * gi;
                    v[i][e] = h.beta2 * v[i][e] + (1.0 - h.beta2) * gi * gi;
                    let mhat = m[i][e] / (1.0 - h.beta1.powi(t as i32 + 1));
                    let vhat = v[i][e] / (1.0 - h.beta2.powi(t as i32 + 1));
                    p[i][e] -= h.lr * (mhat / (vhat.sqrt() + h.eps) + wd * p[i][e]);
                }
            }
            after.push(p.clone());
        }
        (after, norms)
    }

    /// `ShardedAdamW` on `group` DP ranks; rank `r` holds part `r` of each step's gradient (the
    /// parts sum to it). Per rank: the parameters after each step and the returned norms.
    fn sharded(group: usize, p0: &[Vec<f64>], grads: &[Tensors], max_norm: f64) -> Vec<Run> {
        let cfg = cfg();
        ThreadComm::run(group, |world: AnyComm| {
            let b = CpuBackend::<f64>::new();
            let topo = Topology::new(&world, 1, 1).unwrap();
            let r = topo.dp_rank;
            let mut params = ParamStore::zeros(&b, &cfg);
            for (buf, p) in params.bufs.iter_mut().zip(p0) {
                *buf = b.upload_f64(p);
            }
            let mut opt = ShardedAdamW::new(&b, &topo, &params);
            let mut g = params.zeros_like(&b);
            let (mut after, mut norms) = (Vec::new(), Vec::new());
            for (t, full) in grads.iter().enumerate() {
                for (i, buf) in g.bufs.iter_mut().enumerate() {
                    // Ranks below the last hold a pseudo-random share; the last the remainder.
                    let share = |k: usize| -> Vec<f64> {
                        test_values(full[i].len(), (1000 + 100 * t + 10 * i + k) as u64)
                    };
                    let part: Vec<f64> = if r + 1 < group {
                        share(r)
                    } else {
                        let mut rest = full[i].clone();
                        for k in 0..group - 1 {
                            for (x, s) in rest.iter_mut().zip(share(k)) {
                                *x -= s;
                            }
                        }
                        rest
                    };
                    *buf = b.upload_f64(&part);
                }
                norms.push(opt.step(&b, &topo, &mut params, &mut g, hp(t + 1), max_norm));
                after.push(params.bufs.iter().map(|x| b.download_f64(x)).collect());
            }
            (after, norms)
        })
    }

    fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn sharded_adamw_equals_clipped_adamw_and_is_the_same_on_any_group() {
        let cfg = cfg();
        let b = CpuBackend::<f64>::new();
        let init = ParamStore::init_random(&b, &cfg, 3);
        // Norm weights away from 1 and weights away from 0, so decay shows in both.
        let p0: Vec<Vec<f64>> = init
            .bufs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let v = b.download_f64(x);
                let w = test_values(v.len(), 500 + i as u64);
                v.iter().zip(w).map(|(a, e)| a + 0.5 * e).collect()
            })
            .collect();
        let is_norm: Vec<bool> = init.specs.iter().map(|s| s.is_norm).collect();
        assert!(is_norm.iter().any(|&n| n) && is_norm.iter().any(|&n| !n));
        let sizes: Vec<usize> = p0.iter().map(Vec::len).collect();
        let g = grads(&sizes);
        // Clipping on at step 1, off later.
        let max_norm = 0.5 * norm(&g[0]);
        assert!(norm(&g[1]) < max_norm);
        let (want, want_norms) = reference(&p0, &is_norm, &g, max_norm);

        let one = sharded(1, &p0, &g, max_norm).remove(0);
        for t in 0..STEPS {
            let e = max_diff(&one.0[t], &want[t]);
            assert!(e < 1e-13, "group 1, step {}: max error {e:e}", t + 1);
            let n = (one.1[t] - want_norms[t]).abs() / want_norms[t];
            assert!(n < 1e-13, "group 1, step {}: norm rel error {n:e}", t + 1);
        }
        // A slice boundary inside tensors, and (3) a last slice shorter than the others.
        for group in [2, 3] {
            for (r, (after, norms)) in sharded(group, &p0, &g, max_norm).iter().enumerate() {
                for t in 0..STEPS {
                    let e = max_diff(&after[t], &one.0[t]);
                    assert!(
                        e < 1e-12,
                        "group {group} rank {r} step {}: max error {e:e}",
                        t + 1
                    );
                    let n = (norms[t] - one.1[t]).abs() / one.1[t];
                    assert!(
                        n < 1e-12,
                        "group {group} rank {r} step {}: norm {n:e}",
                        t + 1
                    );
                }
            }
        }
    }

    #[test]
    fn clipping_follows_torch_clip_grad_norm() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(5.0, 0.0), 1.0, "0 disables clipping");
        let f = clip_factor(4.0, 1.0);
        assert!((f - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
    }

    #[test]
    fn adamw_step_decays_weights_but_not_norms() {
        let cfg = cfg();
        let b = CpuBackend::<f64>::new();
        let mut p = ParamStore::init_random(&b, &cfg, 3);
        let before: Vec<Vec<f64>> = p.bufs.iter().map(|x| b.download_f64(x)).collect();
        let g = p.zeros_like(&b);
        let (mut m, mut v) = (p.zeros_like(&b), p.zeros_like(&b));
        // A zero gradient: only the decay moves a weight, p·(1 − lr·wd).
        adamw_step(&b, &mut p, &g, &mut m, &mut v, hp(1));
        for (i, s) in p.specs.iter().enumerate() {
            let f = if s.is_norm { 1.0 } else { 1.0 - 1e-2 * 0.1 };
            let want: Vec<f64> = before[i].iter().map(|x| x * f).collect();
            let e = max_diff(&[b.download_f64(&p.bufs[i])], &[want]);
            assert!(e < 1e-15, "{}: {e:e}", s.name);
        }
    }
}
