// keyward-kms-plugin: a minimal KMS v2 plugin for e2e/encryption.sh, so the local plane's
// kube-apiserver can encrypt Secrets through a KMS v2 provider without a cloud KMS.
//
// It serves the KMS v2 gRPC API (k8s.io/kms/pkg/service) on a unix socket and encrypts the API
// server's data-encryption-key seeds with AES-256-GCM under one local key read from a file
// (base64 of 32 bytes, as an aescbc/secretbox key). Its key id is derived from that key
// (`local-` and the first 16 hex digits of its SHA-256), so another key file is another key id.
// A test tool only: the key sits in a file next to it; a real plugin keeps it in an HSM or a
// cloud KMS. It never logs key bytes or plaintexts, only sizes and key ids.
//
//	keyward-kms-plugin -listen /path/kms.sock -key-file /path/kms.key
package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"k8s.io/kms/pkg/service"
)

type plugin struct {
	aead     cipher.AEAD
	keyID    string
	encrypts atomic.Int64
	decrypts atomic.Int64
}

var _ service.Service = (*plugin)(nil)

func newPlugin(keyFile string) (*plugin, error) {
	raw, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, err
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(raw)))
	if err != nil {
		return nil, fmt.Errorf("%s: not base64: %w", keyFile, err)
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("%s: want 32 bytes (AES-256), got %d", keyFile, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(key)
	clear(key)
	return &plugin{aead: aead, keyID: "local-" + hex.EncodeToString(sum[:8])}, nil
}

// Encrypt seals data as nonce || ciphertext || tag, bound to the key id.
func (p *plugin) Encrypt(_ context.Context, uid string, data []byte) (*service.EncryptResponse, error) {
	nonce := make([]byte, p.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	out := p.aead.Seal(nonce, nonce, data, []byte(p.keyID))
	n := p.encrypts.Add(1)
	log.Printf("encrypt #%d uid=%s plaintext=%d bytes ciphertext=%d bytes keyID=%s", n, uid, len(data), len(out), p.keyID)
	return &service.EncryptResponse{Ciphertext: out, KeyID: p.keyID}, nil
}

// Decrypt opens what Encrypt sealed; another key id is refused.
func (p *plugin) Decrypt(_ context.Context, uid string, req *service.DecryptRequest) ([]byte, error) {
	if req.KeyID != p.keyID {
		return nil, fmt.Errorf("unknown key id %q (this plugin holds %q)", req.KeyID, p.keyID)
	}
	ns := p.aead.NonceSize()
	if len(req.Ciphertext) < ns+p.aead.Overhead() {
		return nil, errors.New("ciphertext too short")
	}
	pt, err := p.aead.Open(nil, req.Ciphertext[:ns], req.Ciphertext[ns:], []byte(p.keyID))
	if err != nil {
		return nil, fmt.Errorf("decrypt: %w", err)
	}
	n := p.decrypts.Add(1)
	log.Printf("decrypt #%d uid=%s ciphertext=%d bytes keyID=%s", n, uid, len(req.Ciphertext), req.KeyID)
	return pt, nil
}

func (p *plugin) Status(context.Context) (*service.StatusResponse, error) {
	return &service.StatusResponse{Version: "v2", Healthz: "ok", KeyID: p.keyID}, nil
}

func main() {
	listen := flag.String("listen", "", "unix socket path to serve the KMS v2 API on (required)")
	keyFile := flag.String("key-file", "", "file with the base64 of a 32-byte AES key (required)")
	timeout := flag.Duration("timeout", 10*time.Second, "gRPC connection timeout")
	printKeyID := flag.Bool("print-key-id", false, "print the key id of -key-file and exit")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("[kms-plugin] ")
	if *keyFile == "" || (*listen == "" && !*printKeyID) {
		flag.Usage()
		os.Exit(2)
	}
	p, err := newPlugin(*keyFile)
	if err != nil {
		log.Fatalf("key: %v", err)
	}
	if *printKeyID {
		fmt.Println(p.keyID)
		return
	}
	// A socket left by a killed plugin would make Listen fail.
	if err := os.Remove(*listen); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Fatalf("remove stale socket: %v", err)
	}
	srv := service.NewGRPCService(*listen, *timeout, p)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sig
		log.Printf("%v: stopping", s)
		srv.Close()
	}()
	log.Printf("serving KMS v2 on unix://%s, keyID=%s", *listen, p.keyID)
	err = srv.ListenAndServe()
	_ = os.Remove(*listen)
	if err != nil && !strings.Contains(err.Error(), "server stopped") && !errors.Is(err, context.Canceled) {
		// grpc returns ErrServerStopped after Close; anything else is a real failure.
		log.Printf("serve: %v", err)
	}
	log.Printf("stopped after %d encrypts and %d decrypts", p.encrypts.Load(), p.decrypts.Load())
}
