//! Device eviction in batches: the kernel's `migrate_device_range`. A device that releases its
//! memory (or is removed) hands each address space the frames of its pages at once; the space
//! brings them back to system memory in three steps, as a migration does:
//!
//! 1. under the state lock: each frame is checked against its page entry (the page may have
//!    moved since the reverse map was read), device mappings of the pages are invalidated in
//!    runs (MIGRATE), and the pages are marked MIGRATING and claimed; a coherent-resident page
//!    is released in place (its bytes are already in the CPU view);
//! 2. without the lock: the data is installed into the CPU view, one `UFFDIO_COPY` per run of
//!    pages whose frames are consecutive too (a device the CPU cannot address copies through the
//!    space's bounce buffer, under the lock that guards it);
//! 3. under the lock: the entries become present, the claims end; the frames are freed after.
//!
//! A page that another migration owns is waited for and taken in a later round, so nothing is
//! left in memory that is going away.

use super::*;

/// One unit (a page, or a 2 MiB unit) being evicted.
#[derive(Clone, Copy, Debug)]
struct EvictUnit {
    r: VaRange,
    frame: FrameIdx,
    large: bool,
    /// The start of the mapping it lies in (runs never cross mappings) and its fault mode.
    vma: VirtAddr,
    mode: FaultMode,
}

impl SpaceCore {
    /// Evicts `victims` — frames of `pm`, each with the page of this space the reverse map
    /// named — back to system memory. Frames no longer holding that page are skipped. Returns
    /// the pages moved; the first error (a copy that failed: that page stays in device memory,
    /// untouched) is returned after every other page was tried.
    pub(crate) fn evict_frames(
        &self,
        pm: &Pagemap,
        victims: &[(FrameIdx, usize)],
    ) -> Result<usize> {
        let mut moved = 0;
        let mut first_err = None;
        let mut pending: Vec<(FrameIdx, usize)> = victims.to_vec();
        pending.sort_unstable_by_key(|&(_, vpn)| vpn);
        while !pending.is_empty() {
            let mut st = self.lock_state();
            let mut units: Vec<EvictUnit> = Vec::new();
            let mut busy: Vec<(FrameIdx, usize)> = Vec::new();
            for &(frame, vpn) in &pending {
                let a = Vpn(vpn).addr();
                if units.last().is_some_and(|u| u.r.contains(a)) {
                    // Another frame of a 2 MiB unit already taken.
                    continue;
                }
                let Some(pte) = st.pte(a) else { continue };
                if pte.device_frame().map(|(p, f, _)| (p, f)) != Some((pm.id(), frame))
                    || pte.state() == PageState::Exclusive
                {
                    continue;
                }
                if pte.migrating() {
                    busy.push((frame, vpn));
                    continue;
                }
                if pte.is_coherent() {
                    moved += if pte.large() { PAGES_PER_LARGE } else { 1 };
                    self.demote_coherent_as(&mut st, a, EventKind::Evict);
                    continue;
                }
                let r = fault::unit_range(a, pte.large());
                let head = st.pte(r.start).expect("unit inside the mapping");
                let v = st.vma(a).expect("mapped");
                units.push(EvictUnit {
                    r,
                    frame: head.frame(),
                    large: pte.large(),
                    vma: v.range.start,
                    mode: v.mode,
                });
            }
            // Runs of consecutive units: one invalidation and one claim each.
            let runs = merge(&units, |_, _| true);
            let mut claims = Vec::with_capacity(runs.len());
            for run in &runs {
                self.invalidate(&st, *run, NotifyEvent::Migrate, None);
                st.mark_migrating(*run);
                claims.push(st.register_claim(*run));
            }
            drop(st);
            // Step 2: install runs whose frames are consecutive too, with one copy each.
            let mut ok = vec![true; units.len()];
            let copies: Vec<(usize, usize)> =
                merge_idx(&units, |a, b| b.frame.0 == a.frame.0 + a.r.pages() as u32);
            for &(s, e) in &copies {
                let r = VaRange {
                    start: units[s].r.start,
                    end: units[e - 1].r.end,
                };
                let m = units[s].mode;
                pm.charge_migration(r.len());
                let _bounce = pm.store().host_view().is_none().then(|| self.lock_state());
                match self.install_from_frame(
                    r.start,
                    pm,
                    units[s].frame.offset(),
                    r.len(),
                    m,
                    false,
                ) {
                    Ok(()) | Err(sys::UffdError::Exists) => {}
                    Err(err) => {
                        // Drop what the failed install filled: the pages stay in device memory.
                        let _ = self.mm.zap(r);
                        ok[s..e].fill(false);
                        first_err
                            .get_or_insert(Error::os("copy back to system memory", err.into()));
                    }
                }
            }
            // Step 3. Each copy run is one trace event.
            let mut st = self.lock_state();
            let mut freed = Vec::new();
            for &(s, e) in &copies {
                let done = ok[s];
                for u in &units[s..e] {
                    for k in 0..u.r.pages() {
                        let ak = u.r.start.add(k * PAGE_SIZE);
                        let p = st.pte(ak).expect("a claimed unit is not unmapped");
                        st.set_pte(
                            ak,
                            if done {
                                Pte::present(u.large, p)
                            } else {
                                p.with_migrating(false)
                            },
                        );
                    }
                }
                if !done {
                    continue;
                }
                let r = VaRange {
                    start: units[s].r.start,
                    end: units[e - 1].r.end,
                };
                moved += r.pages();
                self.counters
                    .pages_to_system
                    .fetch_add(r.pages() as u64, Ordering::Relaxed);
                let owner = pm.owner();
                st.trace_with(|| {
                    TraceEvent::moved(
                        EventKind::Evict,
                        Direction::ToSystem,
                        self.id,
                        r.start,
                        r.pages(),
                        owner,
                    )
                });
                freed.extend_from_slice(&units[s..e]);
            }
            for id in claims {
                st.release_claim(id);
            }
            // Pages another migration owned: wait for it, then take them in the next round.
            if !busy.is_empty() {
                let span = VaRange {
                    start: Vpn(busy[0].1).addr(),
                    end: Vpn(busy[busy.len() - 1].1 + 1).addr(),
                };
                st = self.wait_for_migrations(st, span);
            }
            drop(st);
            self.notify_migrations_done();
            for u in freed {
                if u.large {
                    pm.free(u.frame, true);
                } else {
                    pm.free(u.frame, false);
                }
            }
            pending = busy;
        }
        debug_event!(
            space = self.id,
            pagemap = pm.id().0,
            frames = victims.len(),
            pages = moved,
            failed = first_err.is_some(),
            "device frames evicted"
        );
        match first_err {
            Some(e) => Err(e),
            None => Ok(moved),
        }
    }
}

/// Index ranges of maximal runs of `units` (sorted by address) that are adjacent in the
/// address space and in one mapping, and satisfy `also` pairwise.
fn merge_idx(
    units: &[EvictUnit],
    also: impl Fn(&EvictUnit, &EvictUnit) -> bool,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut s = 0;
    for i in 1..=units.len() {
        if i == units.len()
            || units[i].r.start != units[i - 1].r.end
            || units[i].vma != units[i - 1].vma
            || !also(&units[i - 1], &units[i])
        {
            if s < i {
                out.push((s, i));
            }
            s = i;
        }
    }
    out
}

/// The address ranges of [`merge_idx`]'s runs.
fn merge(units: &[EvictUnit], also: impl Fn(&EvictUnit, &EvictUnit) -> bool) -> Vec<VaRange> {
    merge_idx(units, also)
        .into_iter()
        .map(|(s, e)| VaRange {
            start: units[s].r.start,
            end: units[e - 1].r.end,
        })
        .collect()
}
