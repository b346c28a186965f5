// Package seal seals runner secrets to a worker's keys and opens them
// (docs/protocol.md 3.13): an X25519 sealed box, as libsodium's
// crypto_box_seal makes it, of a msgpack payload that names the job, so
// that the secret travels through NATS and rests in its streams as
// ciphertext only the worker holding the key can read. It also reads and
// writes the key files of a worker's keys directory, refusing files that
// others could read or replace.
package seal
