// Offline configuration for stac-node-validator: every schema URL maps to a local copy.
// STAC core 1.1 and GeoJSON come from pystac's bundled schemas (PYSTAC_SCHEMAS, set by the
// repository's test suite), the cbir schema from json-schema/, the other extensions' schemas
// from the copies vendored in the Python package (see their SOURCES.md).
const fs = require('fs');
const path = require('path');

const core = process.env.PYSTAC_SCHEMAS;
if (!core) {
  throw new Error('Set PYSTAC_SCHEMAS to the folder of pystac/validation/jsonschemas');
}
const schemaMap = {
  'https://geojson.org/schema/': path.join(core, 'geojson') + '/',
  'https://stac-extensions.github.io/cbir/v1.0.0/schema.json': path.join(__dirname, 'json-schema', 'schema.json'),
};
for (const spec of ['item-spec', 'collection-spec', 'catalog-spec']) {
  schemaMap[`https://schemas.stacspec.org/v1.1.0/${spec}/json-schema/`] = path.join(core, 'stac-spec', 'v1.1.0') + '/';
}
const vendor = path.join(__dirname, '..', 'stac_rscbir', 'extension', 'schemas', 'vendor');
for (const file of fs.readdirSync(vendor).filter((f) => f.endsWith('.json'))) {
  const id = JSON.parse(fs.readFileSync(path.join(vendor, file), 'utf8'))['$id'].replace(/#$/, '');
  schemaMap[id] = path.join(vendor, file);
}

module.exports = { schemaMap, lint: true, files: [path.join(__dirname, 'examples')] };
