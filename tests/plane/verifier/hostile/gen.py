#!/usr/bin/env python3
"""Writes cases.jsonl: the hostile corpus of `keyward verifier` (tests/plane/verifier/hostile/mod.rs runs it).

Each spec below becomes one case per mode it applies to (nginx auth_request, Envoy ext_authz
shape, reverse proxy). Fields of a case (all but id, tag, finding, mode, want optional):
  id       unique name
  tag      what kind of attack (counts are printed per tag)
  finding  the finding of issue 18 it belongs to (0: none in particular, a baseline check)
  mode     nginx | authz | proxy
  signer   a | b | attacker | a_old (key a's revoked key) | none (empty signature) | tamper (a, one bit flipped)
  header   JOSE header object (default {alg: EdDSA, typ: JWT, kid: $kid}); header_raw: the JSON text
  claims   claims object, merged over the defaults (iss/aud keyward, sub $ns/a, iat/nbf $now, exp $now+600)
  claims_raw  the claims JSON text; drop: claim names removed from the defaults
  token_raw   the whole token text instead ($token: a good token of a)
  auth     how the token is sent: bearer (default) | none | duplicate | basic | raw:<header value>
  route    own (key a's route) | other (key b's) | unbound | trick (the old /ext_authz prefix with a client path naming key a)
  headers  extra request headers [[name, value], ...]
  want     expected status (want_nginx: where nginx answers itself); reason: expected X-Keyward-Reason (checked where the mode passes it on)
  open     true when the case shows a finding not fixed yet: it is counted, not failed
Placeholders: $ns, $kid (the signer's key id), $kid_a, $kid_b, $kid_att, $now, $now+N, $now-N, $token.
Run `python3 tests/plane/verifier/hostile/gen.py` after editing, and commit both files.
"""
import json, os

MODES = ["nginx", "authz", "proxy"]
specs = []

def case(id, tag, finding, want, reason=None, modes=MODES, **kw):
    specs.append(dict(id=id, tag=tag, finding=finding, want=want, reason=reason, modes=modes, **kw))

# Baseline: what must pass.
case("good token", "baseline", 0, 200)
case("good token, scheme in lower case", "baseline", 0, 200, auth="raw:bearer $token")
case("good token, no typ", "baseline", 0, 200, header={"alg": "EdDSA", "kid": "$kid"})

# Forged and malformed tokens.
case("alg none, unsigned", "forged", 0, 401, "UnsupportedAlgorithm", header={"alg": "none", "kid": "$kid"}, signer="none")
case("alg None (case)", "forged", 0, 401, "UnsupportedAlgorithm", header={"alg": "None", "kid": "$kid"}, signer="none")
case("alg HS256 keyed with the public key", "forged", 0, 401, "UnsupportedAlgorithm", header={"alg": "HS256", "typ": "JWT", "kid": "$kid"}, signer="hs256_pub")
case("alg RS256", "forged", 0, 401, "UnsupportedAlgorithm", header={"alg": "RS256", "kid": "$kid"})
case("alg ES256", "forged", 0, 401, "UnsupportedAlgorithm", header={"alg": "ES256", "kid": "$kid"})
case("alg eddsa (case)", "forged", 0, 401, "UnsupportedAlgorithm", header={"alg": "eddsa", "kid": "$kid"})
case("alg missing", "forged", 0, 401, "InvalidToken", header={"typ": "JWT", "kid": "$kid"})
case("signature of another key, kid of a", "forged", 0, 401, "SignatureInvalid", signer="attacker", header={"alg": "EdDSA", "typ": "JWT", "kid": "$kid_a"})
case("one bit of the signature flipped", "forged", 0, 401, "SignatureInvalid", signer="tamper")
case("empty signature", "forged", 0, 401, "SignatureInvalid", signer="none")
case("claims changed after signing", "forged", 0, 401, "SignatureInvalid", signer="resign_claims")
case("unknown kid (attacker's own key)", "forged", 0, 401, "UnknownKeyId", signer="attacker")
case("kid missing", "kid", 0, 401, "InvalidToken", header={"alg": "EdDSA", "typ": "JWT"})
case("kid empty", "kid", 0, 401, "UnknownKeyId", header={"alg": "EdDSA", "kid": ""})
case("kid with a path", "kid", 0, 401, "UnknownKeyId", header={"alg": "EdDSA", "kid": "../../etc/passwd"})
case("kid with a newline", "kid", 8, 401, "UnknownKeyId", header={"alg": "EdDSA", "kid": "$kid_a\nX-Injected: 1"})
case("kid is a number", "kid", 0, 401, "InvalidToken", header_raw='{"alg":"EdDSA","kid":1}')
case("kid of key b on a's claims", "kid", 0, 401, "SignatureInvalid", signer="b", header={"alg": "EdDSA", "kid": "$kid_a"})
case("jku pointing elsewhere", "kid", 0, 401, "UnknownKeyId", signer="attacker", header={"alg": "EdDSA", "kid": "$kid_att", "jku": "http://127.0.0.1:1/jwks.json"})
case("embedded jwk", "kid", 0, 401, "UnknownKeyId", signer="attacker", header={"alg": "EdDSA", "kid": "$kid_att", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}})
case("typ at+jwt", "malformed", 0, 401, "InvalidToken", header={"alg": "EdDSA", "typ": "at+jwt", "kid": "$kid"})
case("crit present", "malformed", 8, 401, "InvalidToken", header={"alg": "EdDSA", "typ": "JWT", "kid": "$kid", "crit": ["exp"]})
case("crit empty", "malformed", 8, 401, "InvalidToken", header={"alg": "EdDSA", "typ": "JWT", "kid": "$kid", "crit": []})
case("duplicate alg in the header", "malformed", 0, 401, "InvalidToken", header_raw='{"alg":"none","alg":"EdDSA","kid":"$kid"}')
case("duplicate sub in the claims", "malformed", 0, 401, "InvalidToken", claims_raw='{"iss":"keyward","sub":"$ns/b","sub":"$ns/a","aud":"keyward","iat":$now,"nbf":$now,"exp":$now+600,"jti":"j"}')
case("duplicate exp in the claims", "malformed", 0, 401, "InvalidToken", claims_raw='{"iss":"keyward","sub":"$ns/a","aud":"keyward","iat":$now,"nbf":$now,"exp":$now+600,"exp":9999999999,"jti":"j"}')
case("garbage", "malformed", 0, 401, "InvalidToken", token_raw="not-a-jwt")
case("two segments", "malformed", 0, 401, "InvalidToken", token_raw="eyJhbGciOiJFZERTQSJ9.e30")
case("four segments", "malformed", 0, 401, "InvalidToken", token_raw="$token.AAAA")
case("base64 padding", "malformed", 0, 401, "InvalidToken", token_raw="$token_padded")
case("standard base64 alphabet", "malformed", 0, 401, "InvalidToken", token_raw="$token_std")
case("header not JSON", "malformed", 0, 401, "InvalidToken", header_raw="not json")
case("header a JSON array", "malformed", 0, 401, "InvalidToken", header_raw='["EdDSA"]')
case("claims not JSON", "malformed", 0, 401, "InvalidToken", claims_raw="not json")
case("exp a string", "malformed", 0, 401, "InvalidToken", claims={"exp": "$now+600"}, quote_exp=True)
case("exp a float", "malformed", 0, 401, "InvalidToken", claims_raw='{"iss":"keyward","sub":"$ns/a","aud":"keyward","iat":$now,"nbf":$now,"exp":1e30,"jti":"j"}')
case("exp missing", "malformed", 0, 401, "InvalidToken", drop=["exp"])
case("sub missing", "malformed", 0, 401, "InvalidToken", drop=["sub"])
case("aud an array", "malformed", 0, 401, "InvalidToken", claims={"aud": ["keyward"]})
case("oversize token (20 KiB)", "malformed", 8, 401, "InvalidToken", claims={"pad": "x" * 20000}, want_nginx=400)
case("good token, trailing space", "baseline", 0, 200, auth="raw:Bearer $token ")

# Time.
case("expired", "time", 0, 401, "TokenExpired", claims={"iat": "$now-700", "nbf": "$now-700", "exp": "$now-100"})
case("not yet valid", "time", 0, 401, "TokenNotYetValid", claims={"nbf": "$now+300", "exp": "$now+600"})
case("issued in the future", "time", 6, 401, "TokenIssuedInFuture", claims={"iat": "$now+300", "nbf": "$now", "exp": "$now+600"})
case("lifetime longer than the ttl", "time", 6, 401, "TokenLifetimeTooLong", claims={"iat": "$now", "nbf": "$now", "exp": "$now+7200"})
case("exp = 2^63-1", "time", 6, 401, "TokenLifetimeTooLong", claims={"exp": 9223372036854775807})
case("iat = -2^63", "time", 6, 401, "TokenLifetimeTooLong", claims={"iat": -9223372036854775808})
case("nbf = -2^63, sane exp", "time", 0, 200, claims={"nbf": -9223372036854775808})
case("exp = -2^63", "time", 0, 401, "TokenExpired", claims={"exp": -9223372036854775808})

# Claims and cross-key.
case("wrong aud", "claims", 0, 401, "WrongAudience", claims={"aud": "other"})
case("wrong iss", "claims", 0, 401, "WrongIssuer", claims={"iss": "evil"})
case("sub of a key that does not exist", "claims", 0, 401, "UnknownKey", claims={"sub": "$ns/nope"})
case("sub not <ns>/<name>", "claims", 0, 401, "BadSubject", claims={"sub": "a"})
case("sub with two slashes", "claims", 0, 401, "BadSubject", claims={"sub": "$ns/a/b"})
case("key b's genuine token on key a's route", "cross-key", 1, 403, "KeyNotAccepted", signer="b", claims={"sub": "$ns/b"})
case("key a's token claiming key b", "cross-key", 1, 401, "UnknownKeyId", claims={"sub": "$ns/b"})
case("key a's token on key b's route", "cross-route", 1, 403, "KeyNotAccepted", route="other")
case("key a's token on the unbound route", "cross-route", 1, 403, "Unbound", route="unbound", modes=["nginx", "authz"])
case("the old ext_authz prefix, client path naming key a", "cross-route", 1, 403, "Unbound", route="trick", modes=["authz"])
case("X-Keyward-Expect-Key cannot widen", "cross-route", 1, 403, "KeyNotAccepted", signer="b", claims={"sub": "$ns/b"}, headers=[["x-keyward-expect-key", "$ns/b"]])

# Revocation.
case("revoked key (still unexpired)", "revoked", 0, 401, "TokenRevoked", signer="a_old")
case("revoked key, replayed with a fresh exp", "revoked", 0, 401, "TokenRevoked", signer="a_old", claims={"iat": "$now", "exp": "$now+60"})

# Injected JWKs (finding 2): a JWK added to the bundle ConfigMap by someone with ConfigMap rights
# (the runner stops the operator first, so the injection stays while the corpus runs). Only key ids
# in the trust record, which only the operator may write, are trusted.
case("token of a JWK injected into the bundle ConfigMap", "injected-jwk", 2, 401, "KeyNotRecorded", signer="injected")
case("token of an injected JWK, fresh times", "injected-jwk", 2, 401, "KeyNotRecorded", signer="injected", claims={"iat": "$now", "nbf": "$now", "exp": "$now+60"})

# Header tricks.
case("no Authorization", "headers", 0, 401, "MissingToken", auth="none")
case("two Authorization headers, good first", "headers", 8, 401, "DuplicateAuthorization", auth="duplicate", modes=["authz", "proxy"])
case("Basic credentials", "headers", 0, 401, "MalformedAuthorization", auth="raw:Basic dXNlcjpwYXNz")
case("Bearer without a token", "headers", 0, 401, "MalformedAuthorization", auth="raw:Bearer ")
case("token without a scheme", "headers", 0, 401, "MalformedAuthorization", auth="raw:$token")
case("Bearer twice", "headers", 0, 401, "InvalidToken", auth="raw:Bearer Bearer $token")
case("forged X-Keyward-Key on the request", "headers", 0, 200, headers=[["x-keyward-key", "$ns/b"], ["x-keyward-kid", "forged"]], check_echo=True, modes=["proxy"])
case("a pod UID header that is not a UUID", "headers", 0, 200, headers=[["x-keyward-pod-uid", "../../x; 00000000-0000-4000-8000-000000000001"]], modes=["authz", "proxy"])

# Forged acknowledgements (finding 5): the key token decides the verdict; a pod is named only by
# a pod token the API server vouches for (tests/plane/verifier.rs::a_pod_acknowledges_only_itself), so
# none of these names a pod, and none may break the request.
case("another pod's UID in the old header", "forged-ack", 5, 200, headers=[["x-keyward-pod-uid", "22222222-2222-4222-8222-222222222222"]], modes=["authz", "proxy"])
case("an unsigned pod token claiming a pod", "forged-ack", 5, 200, headers=[["x-keyward-pod-token", "eyJhbGciOiJub25lIn0.eyJrdWJlcm5ldGVzLmlvIjp7InBvZCI6eyJ1aWQiOiIyMjIyMjIyMi0yMjIyLTQyMjItODIyMi0yMjIyMjIyMjIyMjIifX19."]], modes=["authz", "proxy"])
case("an oversize pod token", "forged-ack", 5, 200, headers=[["x-keyward-pod-token", "x" * 9000]], modes=["authz", "proxy"])
case("two pod token headers", "forged-ack", 5, 200, headers=[["x-keyward-pod-token", "a.b.c"], ["x-keyward-pod-token", "d.e.f"]], modes=["authz", "proxy"])

cases = []
for s in specs:
    modes = s.pop("modes")
    for m in modes:
        c = {k: v for k, v in s.items() if v is not None}
        c["id"] = f"{s['id']} [{m}]"
        c["mode"] = m
        cases.append(c)

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "cases.jsonl"), "w") as f:
    for c in cases:
        f.write(json.dumps(c, ensure_ascii=False) + "\n")
print(len(cases), "cases")
