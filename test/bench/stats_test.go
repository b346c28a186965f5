package bench

import (
	"math"
	"testing"
)

func TestSummarize(t *testing.T) {
	nan := math.NaN()
	tests := []struct {
		name string
		in   []float64
		want Summary
	}{
		{"odd", []float64{3, 1, 2}, Summary{N: 3, Median: 2, Min: 1, Max: 3}},
		{"even", []float64{4, 1, 3, 2}, Summary{N: 4, Median: 2.5, Min: 1, Max: 4}},
		{"missing values left out", []float64{nan, 5, nan}, Summary{N: 1, Median: 5, Min: 5, Max: 5}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Summarize(tt.in); got != tt.want {
				t.Fatalf("Summarize(%v) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
	if s := Summarize([]float64{nan}); s.N != 0 || s.Cell(0) != "-" {
		t.Fatalf("Summarize of nothing = %+v, cell %q", s, s.Cell(0))
	}
}

func TestRatiosArePaired(t *testing.T) {
	got := Ratios([]float64{2, 9, 1, math.NaN()}, []float64{1, 3, 0, 1})
	want := []float64{2, 3, math.NaN(), math.NaN()}
	for i := range want {
		if got[i] != want[i] && !(math.IsNaN(got[i]) && math.IsNaN(want[i])) {
			t.Fatalf("Ratios = %v, want %v", got, want)
		}
	}
	if c := Summarize(got).Cell(1); c != "2.5 (2.0–3.0)" {
		t.Fatalf("cell %q", c)
	}
}

func TestPercentileIsNearestRank(t *testing.T) {
	ten := []float64{10, 1, 9, 2, 8, 3, 7, 4, 6, 5}
	for _, tt := range []struct{ p, want float64 }{{50, 5}, {95, 10}, {10, 1}, {100, 10}} {
		if got := Percentile(ten, tt.p); got != tt.want {
			t.Errorf("Percentile(1..10, %v) = %v, want %v", tt.p, got, tt.want)
		}
	}
	if got := Percentile([]float64{math.NaN(), 3}, 95); got != 3 {
		t.Errorf("NaN not left out: %v", got)
	}
	if !math.IsNaN(Percentile(nil, 50)) {
		t.Error("Percentile of nothing is not NaN")
	}
}
