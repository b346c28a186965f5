package bench

import "testing"

func TestParseGoBench(t *testing.T) {
	out := `goos: linux
BenchmarkReplay/server=process/read=raw-2         	       3	1086868933 ns/op	      1514 B/event	        16.01 allocs/event	     92007 events/s
BenchmarkReplay/server=process/read=raw-2         	       3	1000000000 ns/op	      1500 B/event	        16.00 allocs/event	     90000 events/s
BenchmarkAppend/server=in-process/jobs=64         	    3000	     38096 ns/op	     26250 events/s
PASS
`
	g := GoBench{}
	if err := parseGoBench(out, g); err != nil {
		t.Fatal(err)
	}
	if s := g.Summary("BenchmarkReplay/server=process/read=raw", "B/event"); s.N != 2 || s.Median != 1507 {
		t.Fatalf("raw B/event %+v", s)
	}
	if s := g.Summary("BenchmarkAppend/server=in-process/jobs=64", "events/s"); s.N != 1 || s.Median != 26250 {
		t.Fatalf("append %+v", s)
	}
}
