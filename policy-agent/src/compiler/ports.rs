//! Port ranges as POLICY trie prefixes.

/// A port prefix: the top `bits` bits of `port` (the rest zero). `bits == 0` is every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortPrefix {
    pub port: u16,
    pub bits: u8,
}

impl PortPrefix {
    pub const ALL: PortPrefix = PortPrefix { port: 0, bits: 0 };

    pub const fn exact(port: u16) -> Self {
        PortPrefix { port, bits: 16 }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.bits == 0 || (port ^ self.port) >> (16 - self.bits) == 0
    }
}

/// The minimal set of aligned power-of-two blocks covering `lo..=hi` exactly (at most 30 for
/// 1..=65535). Empty when `lo > hi`.
pub fn range_cover(lo: u16, hi: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // Largest block aligned at `lo` that stays inside the range.
        let mut size_log = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << size_log) - 1 > hi {
            size_log -= 1;
        }
        out.push(PortPrefix {
            port: lo as u16,
            bits: (16 - size_log) as u8,
        });
        lo += 1 << size_log;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(cover: &[PortPrefix]) -> Vec<u16> {
        (0..=u16::MAX)
            .filter(|p| cover.iter().any(|c| c.contains(*p)))
            .collect()
    }

    #[test]
    fn single_port_is_one_full_prefix() {
        assert_eq!(range_cover(80, 80), vec![PortPrefix::exact(80)]);
    }

    #[test]
    fn all_ports_is_one_empty_prefix() {
        assert_eq!(range_cover(0, 65535), vec![PortPrefix::ALL]);
    }

    #[test]
    fn worst_case_is_thirty_prefixes() {
        let c = range_cover(1, 65535);
        assert_eq!(c.len(), 16);
        let c = range_cover(1, 65534);
        assert_eq!(c.len(), 30);
        assert_eq!(covered(&c), (1..=65534).collect::<Vec<_>>());
        assert!(
            (0..=u16::MAX).all(|p| c.iter().any(|x| x.contains(p)) == (1..=65534).contains(&p))
        );
    }

    #[test]
    fn known_covers() {
        // 53..=80: 53, 54-55, 56-63, 64-79, 80.
        assert_eq!(
            range_cover(53, 80),
            vec![
                PortPrefix { port: 53, bits: 16 },
                PortPrefix { port: 54, bits: 15 },
                PortPrefix { port: 56, bits: 13 },
                PortPrefix { port: 64, bits: 12 },
                PortPrefix { port: 80, bits: 16 },
            ]
        );
        assert_eq!(range_cover(80, 81), vec![PortPrefix { port: 80, bits: 15 }]);
        assert!(range_cover(81, 80).is_empty());
    }

    /// The intervals of a cover, in order.
    fn intervals(cover: &[PortPrefix]) -> Vec<(u32, u32)> {
        cover
            .iter()
            .map(|p| {
                let size = 1u32 << (16 - p.bits);
                assert_eq!(u32::from(p.port) % size, 0, "{p:?} not aligned");
                (u32::from(p.port), u32::from(p.port) + size - 1)
            })
            .collect()
    }

    #[test]
    fn covers_are_exact_and_minimal() {
        let mut cases: Vec<(u16, u16)> = (0..70)
            .flat_map(|lo| (lo..70).map(move |hi| (lo, hi)))
            .collect();
        cases.extend([
            (1, 65535),
            (1000, 2000),
            (32767, 32769),
            (65535, 65535),
            (0, 0),
            (1023, 49152),
            (53, 84),
        ]);
        for (lo, hi) in cases {
            let iv = intervals(&range_cover(lo, hi));
            // Exact: consecutive, disjoint intervals from lo to hi.
            assert_eq!(iv.first().map(|i| i.0), Some(u32::from(lo)), "{lo}..={hi}");
            assert_eq!(iv.last().map(|i| i.1), Some(u32::from(hi)), "{lo}..={hi}");
            for w in iv.windows(2) {
                assert_eq!(w[0].1 + 1, w[1].0, "{lo}..={hi}: gap or overlap");
            }
            // Minimal: no two neighbours could merge into one aligned block.
            for w in iv.windows(2) {
                let (a, b) = (w[0], w[1]);
                let size = a.1 - a.0 + 1;
                let mergeable = b.1 - b.0 + 1 == size && a.0 % (2 * size) == 0;
                assert!(!mergeable, "{lo}..={hi}: {a:?} {b:?} mergeable");
            }
        }
    }
}
