// Offline configuration for stac-node-validator: every schema URL maps to a local copy.
// STAC core 1.1 and GeoJSON come from pystac's bundled schemas (PYSTAC_SCHEMAS), PROJJSON from
// pyproj's PROJ data (PROJJSON_SCHEMA), both set by the repository's test suite; the cbir
// schema from json-schema/; the other extensions' schemas from the copies vendored in the
// Python package (see SOURCES.md there).
const fs = require('fs');
const path = require('path');

const core = process.env.PYSTAC_SCHEMAS;
const projjson = process.env.PROJJSON_SCHEMA;
if (!core || !projjson) {
  throw new Error('Set PYSTAC_SCHEMAS (pystac/validation/jsonschemas) and PROJJSON_SCHEMA (pyproj data dir/projjson.schema.json)');
}
const schemaMap = {
  'https://proj.org/schemas/v0.7/projjson.schema.json': projjson,
  'https://geojson.org/schema/': path.join(core, 'geojson') + '/',
  'https://stac-extensions.github.io/cbir/v1.0.0/schema.json': path.join(__dirname, 'json-schema', 'schema.json'),
};
for (const spec of ['item-spec', 'collection-spec', 'catalog-spec']) {
  schemaMap[`https://schemas.stacspec.org/v1.1.0/${spec}/json-schema/`] = path.join(core, 'stac-spec', 'v1.1.0') + '/';
}
const vendor = path.join(__dirname, '..', 'stac_rscbir', 'extension', 'schemas', 'vendor');
// Files are named <extension>-v<version>.json after the URL they were published at (their $id
// may be stale, see SOURCES.md there).
for (const file of fs.readdirSync(vendor).filter((f) => f.endsWith('.json'))) {
  const [, name, version] = file.match(/^(.+)-v([^-]+)\.json$/);
  schemaMap[`https://stac-extensions.github.io/${name}/v${version}/schema.json`] = path.join(vendor, file);
}

module.exports = { schemaMap, lint: true, files: [path.join(__dirname, 'examples')] };
