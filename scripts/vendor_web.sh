#!/bin/sh
# Rebuilds minicpmv/serve/web/vendor/ (the web chat's Markdown, sanitizer, highlighting and math libraries) from
# pinned npm packages. The files are committed, so this runs only to change a version; the server never fetches them.
# Only minified browser builds are kept, with KaTeX's CSS trimmed to the WOFF2 fonts shipped here (the fonts behind
# ordinary formulas; \mathcal, \mathfrak, \mathsf, \texttt and bold italic fall back to the page's fonts).
set -eu
MARKED=18.2.1
DOMPURIFY=3.5.0
KATEX=0.19.1
HLJS=11.12.0
FONTS="AMS-Regular Main-Regular Main-Bold Main-Italic Math-Italic Size1-Regular Size2-Regular Size3-Regular Size4-Regular"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/minicpmv/serve/web/vendor"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" "katex@$KATEX" "@highlightjs/cdn-assets@$HLJS" >/dev/null
for f in *.tgz; do mkdir "${f%.tgz}"; tar xzf "$f" -C "${f%.tgz}"; done
M=marked-$MARKED/package D=dompurify-$DOMPURIFY/package K=katex-$KATEX/package H=highlightjs-cdn-assets-$HLJS/package

rm -rf "$OUT"
mkdir -p "$OUT/katex/fonts" "$OUT/licenses"
cp "$M/lib/marked.umd.js" "$OUT/marked.umd.js"
cp "$D/dist/purify.min.js" "$OUT/purify.min.js"
cp "$H/highlight.min.js" "$OUT/highlight.min.js"
cp "$H/styles/github.min.css" "$OUT/hljs-github.min.css"
cp "$H/styles/github-dark.min.css" "$OUT/hljs-github-dark.min.css"
cp "$K/dist/katex.min.js" "$OUT/katex/katex.min.js"
for font in $FONTS; do cp "$K/dist/fonts/KaTeX_$font.woff2" "$OUT/katex/fonts/"; done
# keep the @font-face rules of the shipped fonts, each with its WOFF2 source only (no requests for absent files)
python3 - "$K/dist/katex.min.css" "$OUT/katex/katex.min.css" $FONTS <<'PY'
import re, sys
source, target, fonts = sys.argv[1], sys.argv[2], set(sys.argv[3:])
css = open(source).read()
def face(m):
    rule = m.group(0)
    name = re.search(r"fonts/KaTeX_([A-Za-z0-9-]+)\.woff2", rule).group(1)
    if name not in fonts:
        return ""
    return re.sub(r"src:[^}]*", f'src:url(fonts/KaTeX_{name}.woff2) format("woff2")', rule)
open(target, "w").write(re.sub(r"@font-face\{[^}]*\}", face, css))
PY
cp "$M/LICENSE" "$OUT/licenses/marked.txt"
cp "$D/LICENSE" "$OUT/licenses/dompurify.txt"
cp "$K/LICENSE" "$OUT/licenses/katex.txt"
cp "$H/LICENSE" "$OUT/licenses/highlight.js.txt"
cat > "$OUT/VERSIONS" <<TXT
Third-party files of the web chat, from npm. Rebuild with scripts/vendor_web.sh; do not edit by hand.

package                  version  files                                            license
marked                   $MARKED   marked.umd.js                                    MIT (licenses/marked.txt)
dompurify                $DOMPURIFY    purify.min.js                                    MPL-2.0 or Apache-2.0 (licenses/dompurify.txt)
@highlightjs/cdn-assets  $HLJS  highlight.min.js, hljs-github.min.css,           BSD-3-Clause (licenses/highlight.js.txt)
                                  hljs-github-dark.min.css
katex                    $KATEX   katex/katex.min.js, katex/katex.min.css,         MIT (licenses/katex.txt)
                                  katex/fonts/ (WOFF2 only: $FONTS)
TXT
du -sh "$OUT"
