// node-oidc-provider issuing client_credentials tokens, as `make bench` measures it beside
// Tollgate: its quick-start in-memory adapter (nothing durable, nothing shared between
// processes), one client, `workers` processes sharing the port (node's cluster module).
//
//   node server.mjs PACKAGE PORT WORKERS CLIENT_ID CLIENT_SECRET
import cluster from 'node:cluster';

const [pkg, port, workers, clientId, clientSecret] = process.argv.slice(2);

if (cluster.isPrimary && Number(workers) > 1) {
  for (let i = 0; i < Number(workers); i += 1) cluster.fork();
  cluster.on('exit', () => process.exit(1)); // a worker that dies fails the measurement
} else {
  const { default: Provider } = await import(pkg);
  const provider = new Provider(`http://127.0.0.1:${port}`, {
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    features: { clientCredentials: { enabled: true }, devInteractions: { enabled: false } },
    ttl: { ClientCredentials: 3600 },
  });
  provider.listen(Number(port), '127.0.0.1');
}
