//! Allocator, sharing, accounting and error tests of the paged latent cache.

use half::bf16;

use super::*;
use crate::Error;

fn widths(spec: &[(usize, usize)]) -> Vec<LayerWidth> {
    spec.iter()
        .map(|&(rank, rope)| LayerWidth { rank, rope })
        .collect()
}

fn cache(block_size: usize, num_blocks: usize, spec: &[(usize, usize)]) -> LatentPagedCache {
    LatentPagedCache::new(CacheConfig {
        block_size,
        num_blocks,
        layers: widths(spec),
    })
    .expect("valid config")
}

/// Distinct, exactly representable rows: value = tag·1000 + token·10 + i/width.
fn rows(tag: usize, from: usize, n: usize, width: usize) -> Vec<f32> {
    (from..from + n)
        .flat_map(|t| {
            (0..width).map(move |i| (tag * 1000 + t * 10) as f32 + i as f32 / width as f32)
        })
        .collect()
}

/// Every live sequence's rows in every layer, for "nothing changed" checks.
fn snapshot(c: &LatentPagedCache, seqs: &[SeqId]) -> Vec<Vec<f32>> {
    seqs.iter()
        .flat_map(|&s| (0..c.num_layers()).map(move |l| c.gather(s, l).unwrap()))
        .collect()
}

#[test]
fn bytes_per_token_is_sum_of_layer_widths() {
    // A CARE-style per-layer plan with rope 64, against Llama-3-8B-like GQA
    // (8 KV heads × 128, K and V) per layer.
    let plan = [(448, 64), (256, 64), (512, 64), (128, 64), (16, 8), (64, 8)];
    let c = cache(16, 3, &plan);
    let want: usize = plan.iter().map(|(r, d)| (r + d) * 4).sum();
    assert_eq!(c.bytes_per_token(), want);
    assert_eq!(c.bytes_per_block(), want * 16);
    assert_eq!(
        c.pool_bytes(),
        want * c.capacity_tokens(),
        "pools hold exactly that"
    );
    let gqa_bytes = plan.len() * 2 * 8 * 128 * 4;
    assert!(c.bytes_per_token() < gqa_bytes);
    // A smaller rank costs exactly its width.
    let smaller = cache(
        16,
        3,
        &[(448, 64), (255, 64), (512, 64), (128, 64), (16, 8), (64, 8)],
    );
    assert_eq!(c.bytes_per_token() - smaller.bytes_per_token(), 4);

    let b = LatentPagedCache::<bf16>::new(CacheConfig {
        block_size: 16,
        num_blocks: 3,
        layers: widths(&plan),
    })
    .unwrap();
    assert_eq!(<bf16 as LatentElem>::BYTES, std::mem::size_of::<bf16>());
    assert_eq!(b.bytes_per_token(), want / 2);
    assert_eq!(b.pool_bytes(), want / 2 * b.capacity_tokens());
}

#[test]
fn append_and_gather_across_block_boundaries() {
    let spec = [(16, 8), (64, 8)];
    let mut c = cache(4, 64, &spec);
    for (tag, &len) in [1usize, 3, 4, 5, 8, 9, 12].iter().enumerate() {
        let s = c.add_sequence();
        for (l, &(r, d)) in spec.iter().enumerate() {
            let w = r + d;
            // Chunks of 1, 3 and the rest, so appends start mid-block.
            let mut at = 0;
            for n in [1, 3, usize::MAX] {
                let n = n.min(len - at);
                c.append(s, l, w, &rows(tag, at, n, w)).unwrap();
                at += n;
            }
            assert_eq!(c.tokens(s, l).unwrap(), len);
            assert_eq!(
                c.gather(s, l).unwrap(),
                rows(tag, 0, len, w),
                "len {len} layer {l}"
            );
        }
        assert_eq!(c.block_table(s).unwrap().blocks().len(), len.div_ceil(4));
    }
    assert_eq!(
        c.used_blocks(),
        [1usize, 3, 4, 5, 8, 9, 12]
            .iter()
            .map(|n| n.div_ceil(4))
            .sum::<usize>()
    );
}

#[test]
fn fork_shares_blocks_and_copies_on_write() {
    let spec = [(16, 8), (32, 8)];
    let mut c = cache(4, 16, &spec);
    let a = c.add_sequence();
    for (l, &(r, d)) in spec.iter().enumerate() {
        c.append(a, l, r + d, &rows(1, 0, 6, r + d)).unwrap();
    }
    assert_eq!(c.used_blocks(), 2);
    let b = c.fork(a).unwrap();
    assert_eq!(c.used_blocks(), 2, "fork copies nothing");
    for &blk in c.block_table(a).unwrap().blocks() {
        assert_eq!(c.refcount(blk), 2);
    }
    // b writes into the shared partial block: it gets a private copy.
    c.append(b, 0, 24, &rows(2, 6, 1, 24)).unwrap();
    assert_eq!(c.used_blocks(), 3);
    let (ta, tb) = (
        c.block_table(a).unwrap().clone(),
        c.block_table(b).unwrap().clone(),
    );
    assert_eq!(ta.blocks()[0], tb.blocks()[0], "full block still shared");
    assert_ne!(ta.blocks()[1], tb.blocks()[1]);
    assert_eq!(c.refcount(ta.blocks()[0]), 2);
    assert_eq!(c.refcount(ta.blocks()[1]), 1);
    // a is untouched; b = a's prefix + its own row; the copy carried layer 1 too.
    assert_eq!(c.gather(a, 0).unwrap(), rows(1, 0, 6, 24));
    let mut want = rows(1, 0, 6, 24);
    want.extend(rows(2, 6, 1, 24));
    assert_eq!(c.gather(b, 0).unwrap(), want);
    assert_eq!(c.gather(b, 1).unwrap(), rows(1, 0, 6, 40));
    // Later appends to b's layer 1 and to a need no more copies.
    c.append(b, 1, 40, &rows(2, 6, 1, 40)).unwrap();
    c.append(a, 0, 24, &rows(3, 6, 2, 24)).unwrap();
    assert_eq!(c.used_blocks(), 3);
    assert_eq!(c.gather(b, 0).unwrap(), want, "a's append leaves b alone");
    c.free(a).unwrap();
    assert_eq!(c.used_blocks(), 2);
    assert_eq!(c.gather(b, 0).unwrap(), want, "freeing a leaves b alone");
    c.free(b).unwrap();
    assert_eq!((c.used_blocks(), c.free_blocks()), (0, 16));
}

#[test]
fn fork_at_block_boundary_needs_no_copy() {
    let mut c = cache(4, 8, &[(16, 8)]);
    let a = c.add_sequence();
    c.append(a, 0, 24, &rows(1, 0, 8, 24)).unwrap();
    let kids: Vec<SeqId> = (0..3).map(|_| c.fork(a).unwrap()).collect();
    for (i, &k) in kids.iter().enumerate() {
        c.append(k, 0, 24, &rows(10 + i, 8, 2, 24)).unwrap();
    }
    assert_eq!(
        c.used_blocks(),
        2 + 3,
        "one new block per child, prefix shared"
    );
    assert_eq!(c.refcount(c.block_table(a).unwrap().blocks()[0]), 4);
    for s in kids.iter().chain([&a]) {
        c.free(*s).unwrap();
    }
    assert_eq!(c.free_blocks(), 8, "every refcount returned to zero");
    assert!((0..8).all(|b| c.refcount(b) == 0));
}

#[test]
fn cache_full_is_an_error_and_changes_nothing() {
    let spec = [(16, 8), (8, 8)];
    let mut c = cache(4, 4, &spec);
    let a = c.add_sequence();
    c.append(a, 0, 24, &rows(1, 0, 6, 24)).unwrap();
    c.append(a, 1, 16, &rows(1, 0, 6, 16)).unwrap();
    let b = c.fork(a).unwrap();
    let before = (
        snapshot(&c, &[a, b]),
        c.free_blocks(),
        c.block_table(b).unwrap().clone(),
    );
    // A sequence longer than the cache can hold.
    let e = c.append(b, 0, 24, &rows(2, 6, 100, 24)).unwrap_err();
    assert!(matches!(e, Error::CacheFull { layer: 0, .. }), "{e}");
    // Fill the pool, then an append that only needs a copy-on-write block.
    let d = c.add_sequence();
    c.append(d, 0, 24, &rows(3, 0, 8, 24)).unwrap();
    assert_eq!(c.free_blocks(), 0);
    let e = c.append(b, 1, 16, &rows(2, 6, 1, 16)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::CacheFull {
                needed_blocks: 1,
                free_blocks: 0,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(snapshot(&c, &[a, b]), before.0);
    assert_eq!(c.block_table(b).unwrap(), &before.2);
    assert_eq!(c.tokens(b, 1).unwrap(), 6);
    c.free(d).unwrap();
    assert_eq!(c.free_blocks(), before.1);
    // With room again the same append succeeds.
    c.append(b, 1, 16, &rows(2, 6, 1, 16)).unwrap();
    assert_eq!(c.gather(a, 1).unwrap(), rows(1, 0, 6, 16));
}

#[test]
fn unknown_sequence_width_mismatch_and_bad_layer_are_errors() {
    let mut c = cache(4, 8, &[(16, 8), (64, 8)]);
    let a = c.add_sequence();
    c.append(a, 0, 24, &rows(1, 0, 5, 24)).unwrap();
    let gone = c.add_sequence();
    c.free(gone).unwrap();
    let before = (snapshot(&c, &[a]), c.used_blocks());
    for e in [
        c.append(gone, 0, 24, &rows(2, 0, 1, 24)).unwrap_err(),
        c.free(gone).unwrap_err(),
        c.fork(gone).unwrap_err(),
        c.view(gone, 0).unwrap_err(),
        c.append(SeqId::from_raw(999), 0, 24, &rows(2, 0, 1, 24))
            .unwrap_err(),
    ] {
        assert!(matches!(e, Error::UnknownSequence { .. }), "{e}");
    }
    // Rows of layer 1's width into layer 0, and a ragged row buffer.
    let e = c.append(a, 0, 72, &rows(2, 5, 1, 72)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::WidthMismatch {
                layer: 0,
                got: 72,
                expected: 24,
                ..
            }
        ),
        "{e}"
    );
    assert!(c.append(a, 0, 24, &[1.0; 25]).is_err());
    assert!(
        c.append(a, 2, 24, &rows(2, 5, 1, 24)).is_err(),
        "no layer 2"
    );
    assert_eq!((snapshot(&c, &[a]), c.used_blocks()), before);
}

#[test]
fn bad_block_ids_are_rejected_by_views() {
    let c = cache(4, 8, &[(16, 8)]);
    let layer = c.layer(0).unwrap();
    let out_of_range = SeqView {
        blocks: &[0, 8],
        tokens: 5,
    };
    assert!(matches!(
        layer.check(&out_of_range),
        Err(Error::BadBlock { block: 8, .. })
    ));
    let too_short = SeqView {
        blocks: &[1],
        tokens: 5,
    };
    assert!(matches!(
        layer.check(&too_short),
        Err(Error::BadBlock { .. })
    ));
    assert!(layer
        .check(&SeqView {
            blocks: &[7, 1],
            tokens: 8
        })
        .is_ok());
}

#[test]
fn truncate_releases_unneeded_blocks() {
    let spec = [(16, 8), (8, 8)];
    let mut c = cache(4, 8, &spec);
    let a = c.add_sequence();
    c.append(a, 0, 24, &rows(1, 0, 9, 24)).unwrap();
    c.append(a, 1, 16, &rows(1, 0, 5, 16)).unwrap();
    assert_eq!(c.used_blocks(), 3);
    c.truncate(a, 0, 6).unwrap();
    assert_eq!(
        c.used_blocks(),
        2,
        "layer 0 now needs 2 blocks, layer 1 needs 2"
    );
    c.truncate(a, 1, 0).unwrap();
    assert_eq!(c.used_blocks(), 2);
    assert_eq!(c.gather(a, 0).unwrap(), rows(1, 0, 6, 24));
    assert!(c.truncate(a, 1, 1).is_err(), "cannot grow");
    c.free(a).unwrap();
    assert_eq!(c.free_blocks(), 8);
}

#[test]
fn bf16_rows_round_trip_within_half_precision() {
    let mut c = LatentPagedCache::<bf16>::new(CacheConfig {
        block_size: 4,
        num_blocks: 4,
        layers: widths(&[(16, 8)]),
    })
    .unwrap();
    let s = c.add_sequence();
    let want = rows(0, 0, 6, 24);
    c.append(s, 0, 24, &want).unwrap();
    for (g, w) in c.gather(s, 0).unwrap().iter().zip(&want) {
        assert!((g - w).abs() <= w.abs() * 2f32.powi(-8), "{g} vs {w}");
    }
}

#[test]
fn bad_configs_are_errors() {
    for (bs, n, spec) in [
        (0, 4, vec![(16, 8)]),
        (4, 0, vec![(16, 8)]),
        (4, 4, vec![]),
        (4, 4, vec![(0, 8)]),
    ] {
        let r = LatentPagedCache::<f32>::new(CacheConfig {
            block_size: bs,
            num_blocks: n,
            layers: widths(&spec),
        });
        assert!(r.is_err(), "{bs} {n} {spec:?}");
    }
}

/// A copy-on-write copy that fails (a device error, on the GPU cache) leaves the block
/// counts, the free list and both sequences' tables as they were.
#[test]
fn failed_copy_on_write_changes_nothing() {
    let mut book = BlockBook::new(CacheConfig {
        block_size: 4,
        num_blocks: 6,
        layers: widths(&[(8, 0), (4, 2)]),
    })
    .unwrap();
    let a = book.add_sequence();
    let none = &mut |_: BlockId, _: BlockId| -> crate::Result<()> { unreachable!() };
    book.reserve(a, 0, 6, none).unwrap(); // blocks 0 and 1, the second half full
    let b = book.fork(a).unwrap();
    let before = (
        book.free_blocks(),
        book.block_table(a).unwrap().clone(),
        book.block_table(b).unwrap().clone(),
        (0..6).map(|i| book.refcount(i)).collect::<Vec<_>>(),
    );
    let mut copies = 0;
    let err = book
        .reserve(b, 0, 1, &mut |_, _| {
            copies += 1;
            Err(Error::InvalidInput("device copy failed".into()))
        })
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert_eq!(copies, 1);
    let after = (
        book.free_blocks(),
        book.block_table(a).unwrap().clone(),
        book.block_table(b).unwrap().clone(),
        (0..6).map(|i| book.refcount(i)).collect::<Vec<_>>(),
    );
    assert_eq!(before, after);
    // And a copy that works gives `b` a private block.
    let slots = book.reserve(b, 0, 1, &mut |_, _| Ok(())).unwrap();
    assert_eq!(slots.len(), 1);
    assert_ne!(
        book.block_table(b).unwrap().blocks()[1],
        book.block_table(a).unwrap().blocks()[1]
    );
}
