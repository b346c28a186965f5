// Package redact removes secrets from text the worker passes on: a
// runner's output, the end of a console log, an error message. A CI job
// may print a secret it was given as it is or encoded (base64 in an HTTP
// header, JSON-escaped in a log line, percent-encoded in a URL), so a
// Scrubber looks for every such form of each secret, and for the first
// bytes of one where the text was cut after them. It imports nothing of
// the worker's, so that every package that scrubs shares the one rule.
package redact
