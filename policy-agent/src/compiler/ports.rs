//! Destination port ranges of one POLICY group (endpoint, peer identity, direction, protocol):
//! the ranges the rules allow, merged into the fewest disjoint ranges that still attribute every
//! port to a rule that allows it.

/// An inclusive port range and the rule reference that allows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuledRange {
    pub first: u16,
    pub last: u16,
    pub rule: u32,
}

impl RuledRange {
    pub const fn new(first: u16, last: u16, rule: u32) -> Self {
        RuledRange { first, last, rule }
    }
}

/// Merges the ranges of one group, given in precedence order (the rule emitted first wins a
/// tie), into sorted, disjoint ranges covering exactly their union:
/// - overlapping, contained and adjacent ranges of one rule become one range;
/// - where ranges of different rules overlap, the result is cut so that each piece lies inside
///   one range of the rule it names, choosing at each point the range that reaches furthest
///   (the fewest pieces; a port allowed by two rules is attributed to one of them). Adjacent
///   ranges of different rules stay apart: fusing them would attribute ports to a rule that
///   does not allow them.
///
/// Empty ranges (`first > last`) are ignored.
pub fn merge(ranges: &[RuledRange]) -> Vec<RuledRange> {
    // (first, precedence) order; `last` as u32 so that 65535 + 1 does not wrap.
    let mut sorted: Vec<(usize, &RuledRange)> = ranges
        .iter()
        .enumerate()
        .filter(|(_, r)| r.first <= r.last)
        .collect();
    sorted.sort_by_key(|(precedence, r)| (r.first, *precedence));
    let mut out: Vec<RuledRange> = Vec::new();
    // The first port not covered yet.
    let mut next: u32 = 0;
    let mut i = 0;
    while i < sorted.len() {
        if u32::from(sorted[i].1.last) < next {
            i += 1;
            continue;
        }
        let start = next.max(u32::from(sorted[i].1.first));
        // Among the ranges that contain `start`, the one reaching furthest (first on a tie).
        let mut best = sorted[i];
        for candidate in sorted[i..]
            .iter()
            .take_while(|(_, r)| u32::from(r.first) <= start)
        {
            if candidate.1.last > best.1.last
                || (candidate.1.last == best.1.last && candidate.0 < best.0)
            {
                best = *candidate;
            }
        }
        let (last, rule) = (best.1.last, best.1.rule);
        match out.last_mut() {
            Some(prev) if prev.rule == rule && u32::from(prev.last) + 1 == start => {
                prev.last = last;
            }
            _ => out.push(RuledRange::new(start as u16, last, rule)),
        }
        next = u32::from(last) + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16, rule: u32) -> RuledRange {
        RuledRange::new(first, last, rule)
    }

    /// The rule merged ranges give each port (checks disjointness on the way).
    fn per_port(ranges: &[RuledRange]) -> Vec<Option<u32>> {
        let mut ports = vec![None; 65536];
        for x in ranges {
            for p in x.first..=x.last {
                assert!(ports[usize::from(p)].is_none(), "{ranges:?} overlap at {p}");
                ports[usize::from(p)] = Some(x.rule);
            }
        }
        ports
    }

    #[test]
    fn all_ports_and_1_to_65535_are_one_range() {
        assert_eq!(merge(&[r(0, 65535, 3)]), vec![r(0, 65535, 3)]);
        assert_eq!(merge(&[r(1, 65535, 3)]), vec![r(1, 65535, 3)]);
    }

    #[test]
    fn adjacent_ranges_of_one_rule_merge() {
        assert_eq!(
            merge(&[r(81, 81, 1), r(80, 80, 1), r(82, 90, 1)]),
            vec![r(80, 90, 1)]
        );
        // Up to the last port without wrapping.
        assert_eq!(
            merge(&[r(65000, 65534, 1), r(65535, 65535, 1)]),
            vec![r(65000, 65535, 1)]
        );
    }

    #[test]
    fn overlapping_ranges_merge() {
        assert_eq!(merge(&[r(80, 90, 1), r(85, 100, 1)]), vec![r(80, 100, 1)]);
        // Rules differ: cut where the first rule's range ends.
        assert_eq!(
            merge(&[r(80, 90, 1), r(85, 100, 2)]),
            vec![r(80, 90, 1), r(91, 100, 2)]
        );
    }

    #[test]
    fn contained_ranges_disappear() {
        assert_eq!(
            merge(&[r(443, 443, 2), r(1, 65535, 1), r(8000, 8100, 1)]),
            vec![r(1, 65535, 1)]
        );
        // The containing range wins whichever comes first.
        assert_eq!(
            merge(&[r(1, 65535, 1), r(443, 443, 2)]),
            vec![r(1, 65535, 1)]
        );
    }

    #[test]
    fn disjoint_ranges_stay_apart_and_sorted() {
        assert_eq!(
            merge(&[r(9000, 9001, 1), r(53, 53, 1), r(100, 99, 1)]),
            vec![r(53, 53, 1), r(9000, 9001, 1)]
        );
        assert_eq!(
            merge(&[r(80, 80, 1), r(81, 81, 2)]),
            vec![r(80, 80, 1), r(81, 81, 2)]
        );
        assert!(merge(&[]).is_empty());
    }

    #[test]
    fn equal_ranges_keep_the_first_rule() {
        assert_eq!(merge(&[r(80, 90, 7), r(80, 90, 2)]), vec![r(80, 90, 7)]);
    }

    #[test]
    fn merged_ranges_cover_exactly_with_a_rule_that_allows_each_port() {
        let cases: Vec<Vec<RuledRange>> = vec![
            vec![r(10, 20, 1), r(15, 30, 2), r(25, 40, 1), r(41, 41, 3)],
            vec![r(0, 65535, 2), r(100, 200, 1), r(65535, 65535, 3)],
            vec![r(5, 5, 1), r(1, 9, 2), r(3, 7, 3), r(8, 12, 1)],
            (0..60u16)
                .map(|i| r(i * 7, i * 7 + 9, u32::from(i % 3)))
                .collect(),
        ];
        for input in cases {
            let out = merge(&input);
            let got = per_port(&out);
            for (port, rule) in got.iter().enumerate() {
                let allowing: Vec<u32> = input
                    .iter()
                    .filter(|x| (x.first..=x.last).contains(&(port as u16)))
                    .map(|x| x.rule)
                    .collect();
                match rule {
                    None => assert!(allowing.is_empty(), "port {port} lost: {input:?}"),
                    Some(rule) => assert!(allowing.contains(rule), "port {port}: {input:?}"),
                }
            }
            assert!(out.windows(2).all(|w| w[0].last < w[1].first), "{out:?}");
            // Minimal for one rule: no two neighbours of the same rule touch.
            assert!(
                out.windows(2)
                    .all(|w| w[0].rule != w[1].rule || w[0].last + 1 < w[1].first),
                "{out:?}"
            );
        }
    }
}
