package bench

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// Summary is a sample described by its median, minimum and maximum.
type Summary struct {
	N                int
	Median, Min, Max float64
}

// Summarize describes xs; NaN values (a figure a run could not give) are
// left out.
func Summarize(xs []float64) Summary {
	var v []float64
	for _, x := range xs {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return Summary{Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	}
	slices.Sort(v)
	med := v[len(v)/2]
	if len(v)%2 == 0 {
		med = (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	return Summary{N: len(v), Median: med, Min: v[0], Max: v[len(v)-1]}
}

// Percentile returns the nearest-rank p-th percentile (0 < p <= 100) of
// xs, NaN values left out.
func Percentile(xs []float64, p float64) float64 {
	var v []float64
	for _, x := range xs {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return math.NaN()
	}
	slices.Sort(v)
	rank := int(math.Ceil(p / 100 * float64(len(v))))
	return v[min(max(rank, 1), len(v))-1]
}

// Ratios returns a[i]/b[i] for each pair, NaN where either is missing or
// b[i] is zero.
func Ratios(a, b []float64) []float64 {
	out := make([]float64, min(len(a), len(b)))
	for i := range out {
		if math.IsNaN(a[i]) || math.IsNaN(b[i]) || b[i] == 0 {
			out[i] = math.NaN()
			continue
		}
		out[i] = a[i] / b[i]
	}
	return out
}

// ms returns d in milliseconds.
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// format writes x with the given number of decimals, "-" for NaN.
func format(x float64, decimals int) string {
	if math.IsNaN(x) {
		return "-"
	}
	return fmt.Sprintf("%.*f", decimals, x)
}

// Cell renders a summary as "median (min–max)".
func (s Summary) Cell(decimals int) string {
	if s.N == 0 {
		return "-"
	}
	if s.N == 1 {
		return format(s.Median, decimals)
	}
	return fmt.Sprintf("%s (%s–%s)", format(s.Median, decimals), format(s.Min, decimals), format(s.Max, decimals))
}
