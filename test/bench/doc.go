// Package bench measures the worker for docs/benchmarks.md: the phases of
// real jobs on real TCG guests against a virsh process per step, the
// scheduling of many jobs on libvirt's test driver with a fake guest
// agent, the worker's memory, and the event stream. It is a harness, not
// part of the product: nothing outside test/bench imports it, and
// test/bench/cmd/bench (go tool task bench) runs it and writes the report.
//
// Every figure is a sample of several runs summarised by median, minimum
// and maximum; comparisons are paired ratios of runs made in turn.
package bench
